"""Reptile's inner Adam state (algorithm.inner_state): `shared` as openai/supervised-reptile (one
Adam for the whole run, tasks in order, its state kept in every checkpoint), `per_task` (a fresh
Adam per task) as metarun's earlier runs; and the outer step's schedule when a run is extended."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import WAY, random_episodes, relative_error, run_metarun, tiny_args

from metarun.algorithms.base import meta_train_step
from metarun.algorithms.reptile import ADAM, Reptile, ReptileBatch
from metarun.data.episodes import Episodes
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.models.learner import ModuleLearner

BETAS, ADAM_EPS = (0.0, 0.999), 1e-8


def linear_reptile(inner_state, impl="batched", **kw):
    return Reptile(
        ModuleLearner(Linear, 3, 1, 2),
        0.3,
        3,
        2,
        train_shots=2,
        inner_batch=4,
        meta_step=0.8,
        meta_step_final=0.2,
        iterations=10,
        impl=impl,
        workers=2,
        inner_state=inner_state,
        **kw,
    )


def hand_shared_reptile(phi, state, x, y, order, lr, eps):
    """Their train_step by hand for the linear learner: the tasks one after another, each from phi,
    through ONE TensorFlow Adam (beta1=0) whose moments and step count carry over from task to task;
    then phi + eps * (mean W - phi). state: {"m": [W, b], "v": [W, b], "t": int}, updated in
    place."""
    adapted = []
    for t in range(x.shape[0]):
        W, b = phi["fc.weight"].clone(), phi["fc.bias"].clone()
        for s in range(order.shape[1]):
            xb, yb = x[t, order[t, s]].flatten(1), y[t, order[t, s]]
            p = torch.softmax(xb @ W.T + b, dim=1)
            d = (p - F.one_hot(yb, 3).to(p.dtype)) / len(yb)
            grads = [d.T @ xb, d.sum(0)]
            state["t"] += 1
            step = state["t"]
            lr_t = lr * math.sqrt(1 - BETAS[1] ** step) / (1 - BETAS[0] ** step)
            new = []
            for i, (w, g) in enumerate(zip((W, b), grads, strict=True)):
                state["m"][i] = BETAS[0] * state["m"][i] + (1 - BETAS[0]) * g
                state["v"][i] = BETAS[1] * state["v"][i] + (1 - BETAS[1]) * g * g
                new.append(w - lr_t * state["m"][i] / (state["v"][i].sqrt() + ADAM_EPS))
            W, b = new
        adapted.append({"fc.weight": W, "fc.bias": b})
    return {k: phi[k] + eps * (torch.stack([a[k] for a in adapted]).mean(0) - phi[k]) for k in phi}


def task_batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(2).expand(4, 6).contiguous()
    order = torch.stack(
        [torch.stack([torch.randperm(6, generator=g)[:4] for _ in range(3)]) for _ in range(4)]
    )
    return ReptileBatch(x, y, order)


@pytest.mark.parametrize("impl", ["batched", "parallel"])
def test_shared_inner_adam_equals_their_train_step_over_two_iterations(impl):
    """Two meta-iterations of 4 tasks: the Adam state after task 4 of iteration 1 is where task 1 of
    iteration 2 starts; the engine's `parallel` is not allowed to reorder the tasks."""
    algo = linear_reptile("shared", impl)
    phi = {
        k: v.requires_grad_(True)
        for k, v in algo.init_meta_params(
            torch.Generator().manual_seed(0), dtype=torch.float64
        ).items()
    }
    assert phi[ADAM + "step"].item() == 0 and phi[ADAM + "v.fc.weight"].abs().sum() == 0
    hand = {k: phi[k].detach().clone() for k in ("fc.weight", "fc.bias")}
    state = {"m": [torch.zeros_like(hand["fc.weight"]), torch.zeros_like(hand["fc.bias"])], "t": 0}
    state["v"] = [torch.zeros_like(m) for m in state["m"]]
    optim = algo.make_optimizer(list(phi.values()), 1e-3)
    for iteration, seed in ((5, 3), (6, 4)):
        batch = task_batch(seed)
        algo.begin_iteration(iteration, optim)
        meta_train_step(algo, phi, optim, batch)
        hand = hand_shared_reptile(
            hand, state, batch.x, batch.y, batch.order, 0.3, algo.current_meta_step
        )
    got = {k: phi[k].detach() for k in hand}
    assert relative_error(got, hand) < 1e-12
    assert phi[ADAM + "step"].item() == state["t"] == 2 * 4 * 3
    assert torch.allclose(phi[ADAM + "v.fc.weight"], state["v"][0], rtol=1e-12, atol=0)
    # ... and it is not what a fresh Adam per task gives (the setting matters)
    fresh = linear_reptile("per_task", impl)
    start = fresh.init_meta_params(torch.Generator().manual_seed(0), dtype=torch.float64)
    per_task = {k: v.requires_grad_(True) for k, v in start.items()}
    optim = fresh.make_optimizer(list(per_task.values()), 1e-3)
    for iteration, seed in ((5, 3), (6, 4)):
        fresh.begin_iteration(iteration, optim)
        meta_train_step(fresh, per_task, optim, task_batch(seed))
    assert relative_error({k: per_task[k].detach() for k in hand}, hand) > 1e-3


def test_per_task_is_the_earlier_reptile_and_has_no_adam_state():
    algo = linear_reptile("per_task")
    phi = {
        k: v.requires_grad_(True)
        for k, v in algo.init_meta_params(
            torch.Generator().manual_seed(0), dtype=torch.float64
        ).items()
    }
    assert not any(k.startswith(ADAM) for k in phi)
    start = {k: v.detach().clone() for k, v in phi.items()}
    batch = task_batch(3)
    optim = algo.make_optimizer(list(phi.values()), 1e-3)
    algo.begin_iteration(5, optim)
    meta_train_step(algo, phi, optim, batch)
    expected = hand_reptile(start, batch.x, batch.y, batch.order, 0.3, "adam", 0.5)
    assert relative_error({k: v.detach() for k, v in phi.items()}, expected) < 1e-12


def test_shared_evaluation_starts_every_task_from_the_runs_adam_state_and_keeps_it():
    """Their evaluate exports the full state (Adam's included) and restores it after each task:
    every task fine-tunes from the same state, and scoring changes nothing."""
    model = Conv4(3, filters=4, image_size=16)
    algo = Reptile(model, 0.01, 2, 3, impl="batched", eval_inner_batch=0, inner_state="shared")
    params = algo.init_meta_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    for k in algo.learner_names():  # a state a run could have reached
        params[ADAM + "v." + k] = torch.rand(params[k].shape, generator=g, dtype=torch.float64)
    params[ADAM + "step"].fill_(40)
    before = {k: v.clone() for k, v in params.items()}
    ep = random_episodes(tasks=3, way=3, shot=1, query=2, seed=2)
    logits = algo.query_logits(params, ep)
    assert all(torch.equal(params[k], before[k]) for k in params)
    # task 2 alone gives the same logits: no task starts from another's end state
    alone = algo.query_logits(params, type(ep)(*(t[2:3] for t in vars(ep).values())))
    assert torch.allclose(alone[0], logits[2], rtol=1e-10, atol=1e-12)
    # a fresh Adam (per_task) fine-tunes differently from that state
    fresh = Reptile(model, 0.01, 2, 3, impl="batched", eval_inner_batch=0)
    learner = {k: params[k] for k in algo.learner_names()}
    assert not torch.allclose(fresh.query_logits(learner, ep), logits)


def test_shared_state_needs_adam_and_one_process(monkeypatch):
    model = Conv4(3, filters=4, image_size=16)
    with pytest.raises(MetarunError, match="inner_optimizer=sgd keeps none"):
        Reptile(model, 0.01, 2, 3, inner_optimizer="sgd", inner_state="shared")
    with pytest.raises(MetarunError, match="inner_state='both'"):
        Reptile(model, 0.01, 2, 3, inner_state="both")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MetarunError, match="torchrun's 2 processes"):
        Reptile(model, 0.01, 2, 3, inner_state="shared")
    Reptile(model, 0.01, 2, 3, inner_state="per_task")  # per_task runs under torchrun as before


REPTILE = [
    "algorithm=reptile",
    "algorithm.train_shots=3",
    "algorithm.inner_batch=4",
    "update_step=2",
    "algorithm.eval_inner_batch=2",
    "update_lr=0.01",
]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_shared_state_resumes_bit_for_bit_and_eval_reproduces_the_test(tiny_root, tmp_path):
    # the annealing's length given, so that the 3-iteration first part is the same run cut short
    extra = [*REPTILE, "algorithm.inner_state=shared", "algorithm.meta_step_iterations=6"]
    extra.append("threads=2")  # the engine's parallel impl: shared runs its tasks in order anyway
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_metarun(*tiny_args(tiny_root, whole, *extra), cwd=tmp_path, check=True)
    run_metarun(*tiny_args(tiny_root, parts, *extra, "iterations=3"), cwd=tmp_path, check=True)
    middle = load(parts / "checkpoints" / "last.pt")
    assert middle["params"][ADAM + "step"].item() == 3 * 2 * 2  # iterations x tasks x inner steps
    assert middle["params"][ADAM + "v.conv0.weight"].abs().sum() > 0
    run_metarun(
        *[a for a in tiny_args(tiny_root, parts, *extra) if not a.startswith("hydra.run.dir")],
        f"resume={parts}",
        cwd=tmp_path,
        check=True,
    )
    a, b = load(whole / "checkpoints" / "last.pt"), load(parts / "checkpoints" / "last.pt")
    assert a["params"][ADAM + "step"].item() == 6 * 2 * 2
    assert set(a["params"]) == set(b["params"])
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    results = json.loads((whole / "results.json").read_text())
    run_metarun(
        "eval",
        f"checkpoint={whole}",
        "tasks=6",
        "eval_chunk=4",
        f"data_root={tiny_root}",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
        check=True,
    )
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scored["accuracy"] == results["test_accuracy"]


def test_a_checkpoint_from_before_the_setting_resumes_with_a_fresh_adam_per_task(
    tiny_root, tmp_path
):
    run = tmp_path / "run"
    run_metarun(*tiny_args(tiny_root, run, *REPTILE, "iterations=3"), cwd=tmp_path, check=True)
    for name in ("last.pt", "best.pt"):  # as metarun wrote them before algorithm.inner_state
        blob = load(run / "checkpoints" / name)
        del blob["config"]["algorithm"]["inner_state"]
        torch.save(blob, run / "checkpoints" / name)
    proc = run_metarun(
        "train", "iterations=6", f"resume={run}", f"dataset.root={tiny_root}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "a fresh inner adam per task" in proc.stdout
    last = load(run / "checkpoints" / "last.pt")
    assert last["iteration"] == 6 and not any(k.startswith(ADAM) for k in last["params"])


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
            for i, (w, g) in enumerate(zip((W, b), grads, strict=True)):
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
