"""ANIL, Reptile and the pre-training baseline against independent references (float64), and each
one's post-adaptation query loss falling on the synthetic task family."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_algorithms import reference
from test_maml import metarun_gradient, random_episodes, relative_error, synthetic_tasks

from metarun.algorithms.anil import ANIL
from metarun.algorithms.base import meta_train_step
from metarun.algorithms.pretrain import ImageBatch, Pretrain
from metarun.algorithms.reptile import Reptile, ReptileBatch
from metarun.data.episodes import Episodes
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.models.learner import ModuleLearner

WAY = 3
HEAD = ["fc.weight", "fc.bias"]


# -- ANIL ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["batched", "parallel"])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_meta_gradient_equals_head_only_reference(impl, first_order):
    model = Conv4(WAY, filters=6, image_size=16)
    ep = random_episodes(tasks=3, way=WAY, shot=2, query=2, seed=1)
    algo = ANIL(model, 0.4, 2, 2, first_order, impl=impl, workers=2)
    meta = algo.init_meta_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    assert set(meta) == set(model.init_params())
    # the definition: only the head's weights take inner steps; the body stays at the meta-weights
    expected = reference(
        meta,
        ep,
        2,
        lambda p, k, s: 0.4,
        lambda p, f, s: {**p, **f},
        HEAD,
        second_order=not first_order,
    )
    got = metarun_gradient(algo, meta, ep)
    assert relative_error(got, expected) < 1e-8
    body = [k for k in meta if k not in HEAD and "weight" in k]
    assert all(
        got[k].abs().max() > 0 for k in body
    )  # the body is meta-learned through the head's adaptation


def test_anil_differs_from_maml_and_refuses_a_missing_head():
    from metarun.algorithms.maml import MAML

    model = Conv4(WAY, filters=6, image_size=16)
    ep = random_episodes(tasks=2, way=WAY, shot=2, query=2, seed=1)
    meta = model.init_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    a = metarun_gradient(ANIL(model, 0.4, 1, 1, impl="batched"), meta, ep)
    b = metarun_gradient(MAML(model, 0.4, 1, 1, impl="batched"), meta, ep)
    assert relative_error(a, b) > 1e-3
    with pytest.raises(MetarunError, match="head_layer='head'"):
        ANIL(model, 0.4, 1, 1, head_layer="head")


# -- Reptile ---------------------------------------------------------------------------------------
class Linear(nn.Module):
    """A tiny linear learner: 2x2 images -> 3 logits."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def hand_reptile(phi, x, y, order, lr, optimizer, eps, betas=(0.0, 0.999), adam_eps=1e-8):
    """Reptile by hand for the linear learner: per task, steps of SGD or TF-Adam on the mean
    cross-entropy, whose gradient is (softmax - onehot)^T [x, 1] / batch; then phi + eps * (mean W -
    phi)."""
    adapted = []
    for t in range(x.shape[0]):
        W, b = phi["fc.weight"].clone(), phi["fc.bias"].clone()
        m = [torch.zeros_like(W), torch.zeros_like(b)]
        v = [torch.zeros_like(W), torch.zeros_like(b)]
        for s in range(order.shape[1]):
            xb, yb = x[t, order[t, s]].flatten(1), y[t, order[t, s]]
            p = torch.softmax(xb @ W.T + b, dim=1)
            d = (p - F.one_hot(yb, 3).to(p.dtype)) / len(yb)
            grads = [d.T @ xb, d.sum(0)]
            if optimizer == "sgd":
                W, b = W - lr * grads[0], b - lr * grads[1]
                continue
            step = s + 1
            lr_t = lr * math.sqrt(1 - betas[1] ** step) / (1 - betas[0] ** step)
            new = []
            for i, (w, g) in enumerate(zip((W, b), grads)):
                m[i] = betas[0] * m[i] + (1 - betas[0]) * g
                v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
                new.append(w - lr_t * m[i] / (v[i].sqrt() + adam_eps))
            W, b = new
        adapted.append({"fc.weight": W, "fc.bias": b})
    return {k: phi[k] + eps * (torch.stack([a[k] for a in adapted]).mean(0) - phi[k]) for k in phi}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("impl", ["batched", "parallel"])
def test_reptile_update_equals_hand_computed(optimizer, impl):
    learner = ModuleLearner(Linear, 3, 1, 2)
    algo = Reptile(
        learner,
        0.3,
        3,
        2,
        train_shots=2,
        inner_batch=4,
        inner_optimizer=optimizer,
        meta_step=0.8,
        meta_step_final=0.2,
        iterations=10,
        impl=impl,
        workers=2,
    )
    phi = {
        k: v.requires_grad_(True)
        for k, v in algo.init_meta_params(
            torch.Generator().manual_seed(0), dtype=torch.float64
        ).items()
    }
    start = {k: v.detach().clone() for k, v in phi.items()}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(2).expand(4, 6).contiguous()
    order = torch.stack(
        [torch.stack([torch.randperm(6, generator=g)[:4] for _ in range(3)]) for _ in range(4)]
    )
    optim = algo.make_optimizer(list(phi.values()), 1e-3)
    algo.begin_iteration(5, optim)  # eps = 0.5 * 0.2 + 0.5 * 0.8
    assert optim.param_groups[0]["lr"] == pytest.approx(0.5)
    meta_train_step(algo, phi, optim, ReptileBatch(x, y, order))
    expected = hand_reptile(start, x, y, order, 0.3, optimizer, 0.5)
    assert relative_error({k: v.detach() for k, v in phi.items()}, expected) < 1e-12
    assert relative_error(expected, start) > 1e-3


def test_reptile_mini_batches_follow_their_order_and_non_transductive_eval_isolates_queries():
    from metarun.algorithms.reptile import mini_batch_order

    order = mini_batch_order(2, 5, 4, 3, torch.Generator().manual_seed(0), "cpu")
    for t in range(2):
        flat = order[t].flatten()
        assert sorted(flat[:5].tolist()) == list(range(5)) and sorted(flat[5:10].tolist()) == list(
            range(5)
        )
    model = Conv4(WAY, filters=6, image_size=16)
    ep = random_episodes(tasks=2, way=WAY, shot=1, query=3, seed=2)
    meta = model.init_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    non = Reptile(model, 0.01, 2, 3, impl="batched", eval_inner_batch=0, transductive=False)
    trans = Reptile(model, 0.01, 2, 3, impl="batched", eval_inner_batch=0, transductive=True)
    a, b = non.query_logits(meta, ep), trans.query_logits(meta, ep)
    # non-transductive: a query image's logits do not depend on the other query images
    ep2 = Episodes(
        ep.x_support,
        ep.y_support,
        torch.cat([ep.x_query[:, :1], torch.rand_like(ep.x_query[:, 1:])], 1),
        ep.y_query,
    )
    assert torch.allclose(non.query_logits(meta, ep2)[:, 0], a[:, 0], atol=1e-12)
    assert not torch.allclose(trans.query_logits(meta, ep2)[:, 0], b[:, 0], atol=1e-6)


# -- the pre-training baseline ---------------------------------------------------------------------
class Flat(nn.Module):
    """Identity body and a linear head `fc`: the baseline's features are the inputs themselves."""

    def __init__(self, way=4):
        super().__init__()
        self.fc = nn.Linear(4, way)

    def forward(self, x):
        return self.fc(x.flatten(1))


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
        from test_maml import plain_forward

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
        expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        assert relative_error(got, expected) < 1e-10


# -- every new algorithm lowers the post-adaptation query loss -------------------------------------
def post_loss(algo, params, ep):
    logits = algo.query_logits(params, ep)
    return F.cross_entropy(logits.flatten(0, 1), ep.y_query.flatten()).item()


@pytest.mark.parametrize("name", ["anil", "reptile", "pretrain"])
def test_each_new_algorithm_lowers_post_adaptation_query_loss(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pool = (torch.rand(40, 1, 14, 14, generator=g) > 0.6).float()
    model = Conv4(way=3, filters=16, image_size=14)
    if name == "anil":
        algo, lr = ANIL(model, 0.4, 1, 3, impl="batched"), 1e-2
    elif name == "reptile":
        algo, lr = (
            Reptile(
                model,
                1e-2,
                4,
                8,
                train_shots=4,
                inner_batch=6,
                meta_step=1.0,
                meta_step_final=0.0,
                iterations=40,
                eval_inner_batch=0,
                transductive=True,
                impl="batched",
            ),
            None,
        )
    else:
        algo, lr = Pretrain(model, num_classes=40, finetune_epochs=30, impl="batched"), 1e-2
    params = {
        k: v.requires_grad_(True)
        for k, v in algo.init_meta_params(torch.Generator().manual_seed(0)).items()
    }
    held_out = synthetic_tasks(pool, 64, 3, 1, 5, torch.Generator().manual_seed(99))
    before = post_loss(algo, params, held_out)
    optimizer = algo.make_optimizer(list(params.values()), lr or 1e-3)
    for it in range(40):
        algo.begin_iteration(it, optimizer)
        if name == "pretrain":
            idx = torch.randint(0, 40, (32,), generator=g)
            batch = ImageBatch(pool[idx] + 0.35 * torch.randn(32, 1, 14, 14, generator=g), idx)
        else:
            ep = synthetic_tasks(
                pool, 8, 3, 2 if name == "reptile" else 1, 2 if name == "reptile" else 5, g
            )
            batch = algo.bench_batch(ep, g)
        meta_train_step(algo, params, optimizer, batch)
    after = post_loss(algo, params, held_out)
    # measured: anil 0.88 -> 0.16, reptile 0.32 -> 0.18, pretrain 1.07 -> 0.70
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("name", ["anil", "reptile", "pretrain"])
def test_constructing_a_new_algorithm_changes_no_process_state(name):
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    learner = Conv4(WAY, filters=4, image_size=16)
    for impl in ("auto", "parallel"):
        kw = dict(impl=impl, workers=2 if impl == "parallel" else 0)
        algo = {
            "anil": lambda: ANIL(learner, 0.4, 1, 1, **kw),
            "reptile": lambda: Reptile(learner, 0.4, 1, 1, **kw),
            "pretrain": lambda: Pretrain(learner, num_classes=4, **kw),
        }[name]()
        algo.init_meta_params(torch.Generator().manual_seed(0))
        assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_default_dtype() == torch.float32
