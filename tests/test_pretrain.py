"""The pre-training baseline (metarun/algorithms/pretrain.py): its fine-tuned head and its
pre-training gradient against independent computations (float64)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import WAY, Flat, metarun_gradient, relative_error

from metarun.algorithms.pretrain import ImageBatch, Pretrain
from metarun.data.episodes import Episodes
from metarun.models.conv4 import Conv4
from metarun.models.learner import ModuleLearner


def separable_tasks(tasks=20, way=4, shot=5, query=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.eye(4, dtype=torch.float64)[:way]
    perm = torch.stack([torch.randperm(way, generator=g) for _ in range(tasks)])

    def draw(n):
        y = perm.unsqueeze(-1).expand(tasks, way, n).reshape(tasks, way * n)
        x = centers[y] + 0.3 * torch.randn(tasks, way * n, 4, generator=g, dtype=torch.float64)
        return x.view(tasks, way * n, 1, 2, 2), y

    return Episodes(*draw(shot), *draw(query))


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_baseline_fine_tuned_head_separates_a_linearly_separable_task(head):
    learner = ModuleLearner(Flat, 4, 1, 2)
    ep = separable_tasks()
    accuracy = {}
    for lr in (1e-9, 0.01):
        algo = Pretrain(learner, head=head, num_classes=5, finetune_lr=lr, impl="batched")
        meta = algo.init_meta_params(torch.Generator().manual_seed(0), dtype=torch.float64)
        assert set(meta) == {
            "pretrain.weight",
            "pretrain.bias" if head == "linear" else "pretrain.gain",
        }
        accuracy[lr] = algo.evaluate(meta, ep).mean().item()
    assert accuracy[0.01] == 1.0 and accuracy[1e-9] < 0.9, accuracy


def test_baseline_pretraining_gradient_is_plain_classification():
    model = Conv4(WAY, filters=6, image_size=16)
    for head in ("linear", "cosine"):
        algo = Pretrain(model, head=head, num_classes=7, impl="batched")
        meta = algo.init_meta_params(torch.Generator().manual_seed(0), dtype=torch.float64)
        assert "fc.weight" not in meta and meta["pretrain.weight"].shape == (7, 6)
        g = torch.Generator().manual_seed(1)
        batch = ImageBatch(
            torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(6) % 7
        )
        got = metarun_gradient(algo, meta, batch)
        # reference: the plain conv4 body (mean of the last map) and the classifier written out
        from helpers import plain_forward

        leaves = {k: v.clone().requires_grad_(True) for k, v in meta.items()}
        body = {
            **leaves,
            "fc.weight": torch.eye(6, dtype=torch.float64),
            "fc.bias": torch.zeros(6, dtype=torch.float64),
        }
        f = plain_forward(body, batch.x, "stride")
        if head == "linear":
            logits = f @ leaves["pretrain.weight"].T + leaves["pretrain.bias"]
        else:
            w = leaves["pretrain.weight"]
            w = leaves["pretrain.gain"][:, None] * w / w.norm(dim=1, keepdim=True)
            logits = 2 * (f / (f.norm(dim=1, keepdim=True) + 1e-5)) @ w.T
        loss = F.cross_entropy(logits, batch.y)
        expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        assert relative_error(got, expected) < 1e-10
