"""The paper presets against the authors' code, the paper-faithful settings they use, the
learning-curve evaluation, and a short run of cbfinn/maml's Omniglot protocol on the CPU whose
learning curve must stay where it was measured."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, compose, random_episodes, relative_error, run_metarun, tiny_args
from omegaconf import OmegaConf

from metarun.algorithms.maml import MAML
from metarun.models.conv4 import Conv4

# -- 1. Each preset is exactly the documented protocol (README "Faithfulness") ---------------------
# The settings every maml_paper cell shares (cbfinn/maml: main.py, maml.py, utils.py,
# data_generator.py).
MAML_PAPER = {
    "algorithm.name": "maml",
    "algorithm.inner_loss": "sum_over_shot",
    "meta_lr": 0.001,
    "iterations": 60000,
    "first_order": False,
    "test_tasks": 600,
    "model.filters": 64,
    "model.downsample": "stride",
    "model.bn_scale": False,
    "model.adapt_bn": False,
    "model.head_init": "normal",
    "model.activation": "relu",
    "model.bn_eps": 1e-3,
    "dataset.name": "omniglot",
    "dataset.image_size": 28,
    "dataset.resize": "nearest",
    "dataset.split": "maml",
    "dataset.split_sizes": [1100, 100],
    "dataset.rotate": True,
    "dataset.rotate_eval": True,
}
# The MAML++ repository's Omniglot configs (experiment_config/omniglot_maml++-omniglot_*.json).
MAMLPP_PAPER = {
    "algorithm.name": "mamlpp",
    "algorithm.inner_loss": "mean",
    "query": 1,
    "meta_batch": 8,
    "update_lr": 0.1,
    "update_step": 5,
    "update_step_test": 5,
    "meta_lr": 0.001,
    "iterations": 50000,
    "first_order": False,
    "keep_best": 5,
    "val_tasks": 600,
    "test_tasks": 600,
    "algorithm.iterations_per_epoch": 500,
    "algorithm.fit_schedule": False,
    "algorithm.msl": True,
    "algorithm.msl_epochs": 10,
    "algorithm.first_order_epochs": 0,
    "algorithm.bnwb": True,
    "algorithm.lslr": True,
    "algorithm.cosine_annealing": True,
    "algorithm.min_meta_lr": 1e-5,
    "algorithm.inner_bn": False,
    "model.filters": 64,
    "model.downsample": "maxpool",
    "model.bn_scale": True,
    "model.head_init": "xavier",
    "model.activation": "leaky_relu",
    "model.bn_eps": 1e-5,
    "dataset.image_size": 28,
    "dataset.resize": "nearest",
    "dataset.split_sizes": [1150, 50],
    "dataset.rotate": True,
    "dataset.rotate_eval": False,
}
PRESETS = {
    "maml_paper/omniglot_5way_1shot": {
        **MAML_PAPER,
        "way": 5,
        "shot": 1,
        "query": 1,
        "meta_batch": 32,
        "update_lr": 0.4,
        "update_step": 1,
        "update_step_test": 3,
    },
    "maml_paper/omniglot_5way_5shot": {
        **MAML_PAPER,
        "way": 5,
        "shot": 5,
        "query": 5,
        "meta_batch": 32,
        "update_lr": 0.4,
        "update_step": 1,
        "update_step_test": 3,
    },
    "maml_paper/omniglot_20way_1shot": {
        **MAML_PAPER,
        "way": 20,
        "shot": 1,
        "query": 1,
        "meta_batch": 16,
        "update_lr": 0.1,
        "update_step": 5,
        "update_step_test": 5,
    },
    "maml_paper/omniglot_20way_5shot": {
        **MAML_PAPER,
        "way": 20,
        "shot": 5,
        "query": 5,
        "meta_batch": 16,
        "update_lr": 0.1,
        "update_step": 5,
        "update_step_test": 5,
    },
    "mamlpp_paper/omniglot_5way_1shot": {**MAMLPP_PAPER, "way": 5, "shot": 1},
    "mamlpp_paper/omniglot_5way_5shot": {**MAMLPP_PAPER, "way": 5, "shot": 5},
    "mamlpp_paper/omniglot_20way_1shot": {**MAMLPP_PAPER, "way": 20, "shot": 1},
    "mamlpp_paper/omniglot_20way_5shot": {**MAMLPP_PAPER, "way": 20, "shot": 5},
}
# metarun's defaults of the faithfulness settings: the behaviour before they existed.
DEFAULTS = {
    "model.bn_eps": 1e-3,
    "model.bn_scale": True,
    "model.adapt_bn": True,
    "model.head_init": "xavier",
    "model.activation": "relu",
    "dataset.resize": "lanczos",
    "dataset.rotate_eval": False,
    "dataset.split_sizes": [1100, 100],
    "query": 1,
    "query_test": None,
    "meta_grad_clip": None,
    "schedule_iterations": None,
}


def test_every_paper_preset_is_in_the_table():
    found = {
        str(p.relative_to(REPO / "conf" / "experiment").with_suffix(""))
        for d in ("maml_paper", "mamlpp_paper")
        for p in (REPO / "conf" / "experiment" / d).glob("*.yaml")
    }
    assert found == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_to_exactly_the_documented_settings(preset):
    cfg = compose(f"experiment={preset}")
    got = {k: OmegaConf.select(cfg, k) for k in PRESETS[preset]}
    got = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in got.items()}
    assert got == PRESETS[preset]


def test_defaults_are_the_behaviour_before_the_settings_existed():
    cfg = compose()
    got = {k: OmegaConf.select(cfg, k) for k in DEFAULTS}
    assert {
        k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in got.items()
    } == DEFAULTS


def test_nested_presets_are_packaged():
    text = (REPO / "pyproject.toml").read_text()
    for d in ("maml_paper", "mamlpp_paper"):
        assert (
            f'"metarun.conf.experiment.{d}"' in text
            and f'"metarun.conf.experiment.{d}" = ["*.yaml"]' in text
        )


# -- 2. adapt_bn=false: batch norm meta-learned, not adapted ---------------------------------------
def offset_only_forward(p, x, bn_scale):
    """One task, written out: conv -> batch norm (batch statistics, eps 1e-3, scale only if
    bn_scale) -> ReLU."""
    h = x
    for i in range(4):
        h = F.conv2d(h, p[f"conv{i}.weight"], p[f"conv{i}.bias"], stride=2, padding=1)
        mean, var = (
            h.mean(dim=(0, 2, 3), keepdim=True),
            h.var(dim=(0, 2, 3), unbiased=False, keepdim=True),
        )
        h = (h - mean) / torch.sqrt(var + 1e-3)
        if bn_scale:
            h = h * p[f"bn{i}.weight"].view(1, -1, 1, 1)
        h = F.relu(h + p[f"bn{i}.bias"].view(1, -1, 1, 1))
    return h.mean(dim=(2, 3)) @ p["fc.weight"].t() + p["fc.bias"]


def frozen_bn_reference(params, ep, way, lr, steps, bn_scale):
    """Per task: `steps` SGD steps on every weight but the batch-norm ones (they stay the
    meta-parameters, as in cbfinn/maml), second order; d(mean query loss)/d(params) for every
    parameter."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    losses = []
    for t in range(ep.x_support.shape[0]):
        fast = dict(leaves)
        for _ in range(steps):
            logits = offset_only_forward(fast, ep.x_support[t], bn_scale)
            loss = F.cross_entropy(logits, ep.y_support[t], reduction="sum") / (
                len(ep.y_support[t]) // way
            )
            adapt = [k for k in fast if not k.startswith("bn")]
            grads = torch.autograd.grad(loss, [fast[k] for k in adapt], create_graph=True)
            fast = {**fast, **{k: fast[k] - lr * g for k, g in zip(adapt, grads, strict=True)}}
        losses.append(
            F.cross_entropy(offset_only_forward(fast, ep.x_query[t], bn_scale), ep.y_query[t])
        )
    return dict(
        zip(
            leaves,
            torch.autograd.grad(torch.stack(losses).mean(), list(leaves.values())),
            strict=True,
        )
    )


@pytest.mark.parametrize("bn_scale", [False, True])
@pytest.mark.parametrize("impl", ["batched", "parallel"])
def test_frozen_batch_norm_meta_gradient_equals_reference(bn_scale, impl):
    way, steps, lr = 3, 2, 0.4
    model = Conv4(
        way, filters=6, image_size=16, bn_scale=bn_scale, adapt_bn=False, head_init="normal"
    )
    maml = MAML(model, lr, steps, steps, impl=impl, workers=2 if impl == "parallel" else 0)
    params = model.init_params(torch.Generator().manual_seed(3), dtype=torch.float64)
    assert ("bn0.weight" in params) == bn_scale and "bn0.bias" in params
    ep = random_episodes(tasks=3, way=way, shot=2, query=2, seed=4)
    # the inner loop leaves batch norm out: its fast weights are the slow ones after adaptation
    start = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    fast = maml.adapt(start, ep.x_support, ep.y_support, steps, create_graph=False)
    assert not any(k.startswith("bn") for k in fast) and "conv0.weight" in fast
    used = maml.learner_weights(start, fast, steps - 1, 3)
    for k in model.bn_names():
        assert torch.equal(used[k], params[k].expand(3, *params[k].shape))
    assert not torch.equal(used["conv0.weight"][0], params["conv0.weight"])
    # ... while they still get meta-gradients, equal to the per-task reference's
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    maml.accumulate_meta_gradient(leaves, ep)
    got = {k: v.grad for k, v in leaves.items()}
    expected = frozen_bn_reference(params, ep, way, lr, steps, bn_scale)
    assert relative_error(got, expected) < 1e-10
    assert all(got[k].abs().sum() > 0 for k in model.bn_names())
    # and adapting batch norm gives another gradient (the setting matters)
    adapting = MAML(
        Conv4(way, filters=6, image_size=16, bn_scale=bn_scale, head_init="normal"),
        lr,
        steps,
        steps,
    )
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    adapting.accumulate_meta_gradient(leaves, ep)
    assert relative_error({k: v.grad for k, v in leaves.items()}, expected) > 1e-6


@pytest.mark.parametrize("name", ["maml", "metasgd", "mamlpp"])
def test_every_algorithm_leaves_frozen_batch_norm_out_of_the_inner_loop(name):
    """The algorithms whose inner loop adapts `adapted_names` (ANIL adapts the head only; the
    baseline fine-tunes a new head; Reptile refuses the setting, below)."""
    from helpers import build

    model = Conv4(3, filters=4, image_size=16, adapt_bn=False)
    algo = build(name, model)
    params = algo.init_meta_params(torch.Generator().manual_seed(0))
    adapted = algo.adapted_names(params)
    assert adapted and not any(k.startswith("bn") for k in adapted)
    ep = random_episodes(tasks=2, way=3, shot=1, query=1, dtype=torch.float32)
    algo.begin_iteration(0, None)
    leaves = {k: v.requires_grad_(True) for k, v in params.items()}
    assert algo.accumulate_meta_gradient(leaves, ep).meta_loss.isfinite()


def test_head_init_normal_has_unit_std_and_xavier_is_unchanged():

    def g():
        return torch.Generator().manual_seed(0)

    normal = Conv4(20, filters=64, head_init="normal").init_params(g())["fc.weight"]
    assert abs(normal.std().item() - 1.0) < 0.05
    xavier = Conv4(20, filters=64).init_params(g())["fc.weight"]
    assert xavier.abs().max() <= (6 / (64 + 20)) ** 0.5
    # the conv weights are drawn first, so only the head differs
    a, b = Conv4(5, head_init="normal").init_params(g()), Conv4(5).init_params(g())
    assert all(torch.equal(a[k], b[k]) for k in a if k != "fc.weight")


def test_bad_model_settings_are_refused():
    from metarun.errors import MetarunError

    with pytest.raises(MetarunError, match="model.head_init='uniform'"):
        Conv4(5, head_init="uniform")
    with pytest.raises(MetarunError, match="model.activation='tanh'"):
        Conv4(5, activation="tanh")


# -- 3. dataset.resize and the cache ---------------------------------------------------------------
def test_resize_nearest_is_binary_and_lanczos_has_grey_levels(tiny_root, tmp_path):
    from metarun.data.omniglot import load_omniglot

    base = {
        "root": str(tiny_root),
        "source": "auto",
        "download": False,
        "cache_dir": str(tmp_path),
        "image_size": 28,
    }
    nearest = load_omniglot(OmegaConf.create({**base, "resize": "nearest"}))
    lanczos = load_omniglot(OmegaConf.create({**base, "resize": "lanczos"}))
    assert set(np.unique(nearest.images.numpy())) == {0, 255}
    assert len(np.unique(lanczos.images.numpy())) > 10
    # one cache per method; the Lanczos one keeps the name older metarun wrote, and each is reused
    # as is
    assert {p.name for p in tmp_path.glob("*.pt")} == {"omniglot_28.pt", "omniglot_28_nearest.pt"}
    again = load_omniglot(OmegaConf.create({**base, "resize": "nearest"}))
    assert torch.equal(again.images, nearest.images)
    blob = torch.load(tmp_path / "omniglot_28.pt", weights_only=True)
    blob.pop("resize")  # a cache written before dataset.resize existed is a Lanczos one
    torch.save(blob, tmp_path / "omniglot_28.pt")
    assert torch.equal(
        load_omniglot(OmegaConf.create({**base, "resize": "lanczos"})).images, lanczos.images
    )
    torch.save(
        {**blob, "resize": "nearest"}, tmp_path / "omniglot_28.pt"
    )  # a mislabelled cache is rebuilt
    assert torch.equal(
        load_omniglot(OmegaConf.create({**base, "resize": "lanczos"})).images, lanczos.images
    )


def test_split_sizes_and_rotated_evaluation_tasks(tiny_root):
    from metarun.data.episodes import fixed_tasks
    from metarun.data.omniglot import load_omniglot, split_characters
    from metarun.errors import MetarunError

    data = load_omniglot(
        OmegaConf.create(
            {
                "root": str(tiny_root),
                "source": "auto",
                "download": False,
                "cache_dir": str(tiny_root / "cache"),
                "image_size": 28,
            }
        )
    )
    total = len(data.character_names)
    a = split_characters(data, "maml", 1, 5, (1100, 100))
    b = split_characters(data, "maml", 1, 5, (1150, 50))
    assert len(b["train"]) == round(total * 1150 / 1623) and len(b["val"]) == max(
        1, round(total * 50 / 1623)
    )
    assert (
        len(a["train"]) < len(b["train"])
        and len(a["train"]) + len(a["val"]) + len(a["test"]) == total
    )
    with pytest.raises(MetarunError, match="dataset.split_sizes"):
        split_characters(data, "maml", 1, 5, (1600, 100))
    classes = data.class_images(a["test"])
    plain = next(fixed_tasks(classes, "test", 3, 1, 1, "cpu", 8, seed=5, chunk=8))
    turned = next(fixed_tasks(classes, "test", 3, 1, 1, "cpu", 8, seed=5, chunk=8, rotate=True))
    again = next(fixed_tasks(classes, "test", 3, 1, 1, "cpu", 8, seed=5, chunk=8, rotate=True))
    assert torch.equal(turned.x_query, again.x_query) and not torch.equal(
        turned.x_query, plain.x_query
    )


@pytest.mark.parametrize("rotate_eval", [False, True])
def test_rotate_eval_reaches_the_tasks_that_are_scored(rotate_eval):
    """dataset.rotate_eval must change what evaluate_tasks (validation, test, metarun eval) scores:
    every scored image unrotated without it, all four rotations with it."""
    from helpers import ids, labelled_classes

    from metarun.runner.evaluate import evaluate_tasks

    scored = []

    class Recorder:  # stands in for an algorithm: records the episodes it is asked to score
        def evaluate(self, params, ep, steps):
            scored.append(ep)
            return torch.ones(ep.x_query.shape[0])

    cfg = OmegaConf.create(
        {
            "way": 4,
            "shot": 1,
            "query": 2,
            "eval_seed": 7,
            "eval_chunk": 6,
            "dataset": {"rotate_eval": rotate_eval},
        }
    )
    mean, _ = evaluate_tasks(Recorder(), {}, labelled_classes(), "test", cfg, "cpu", tasks=20)
    turns = [k for ep in scored for x in (ep.x_support, ep.x_query) for (_, _, k) in ids(x)]
    assert mean == 1.0 and len(turns) == 20 * 4 * (1 + 2)
    assert set(turns) == ({0, 1, 2, 3} if rotate_eval else {0})


# -- 4. The learning curve: accuracy after 0, 1, 3 inner steps in one pass -------------------------
def test_curve_gives_one_accuracy_per_step_count_and_chance_before_adaptation(tiny_root):
    from metarun.runner.evaluate import evaluate_curve, evaluate_tasks
    from metarun.runner.setup import build_algorithm, load_splits

    cfg = compose(
        "way=3",
        "shot=1",
        "query=5",
        "model.filters=8",
        f"dataset.root={tiny_root}",
        f"dataset.cache_dir={tiny_root / 'cache'}",
        "eval_chunk=100",
    )
    _, algo = build_algorithm(cfg, torch.device("cpu"))
    splits = load_splits(cfg, torch.device("cpu"))["splits"]
    params = algo.init_meta_params(torch.Generator().manual_seed(0))
    curve = evaluate_curve(
        algo, params, splits["test"], "test", cfg, torch.device("cpu"), 400, [0, 1, 3]
    )
    assert len(curve) == 3
    # before adaptation a fresh learner knows nothing of the task's random labels: chance, 1/way
    # (400 tasks x 15 queries: the standard error is ~1%)
    assert abs(curve[0][0] - 1 / 3) < 0.04
    # each point is what a separate evaluation with that many steps gives, on the same tasks
    for steps, (mean, ci) in zip([1, 3], curve[1:], strict=True):
        assert (mean, ci) == pytest.approx(
            evaluate_tasks(
                algo, params, splits["test"], "test", cfg, torch.device("cpu"), 400, steps
            ),
            abs=1e-6,
        )
    assert curve[2][0] > curve[0][0] + 0.1  # adapting helps


def test_eval_steps_from_the_cli_and_old_checkpoints_still_load(tiny_root, tmp_path):
    run = tmp_path / "run"
    run_metarun(*tiny_args(tiny_root, run), cwd=tmp_path, check=True)
    out = run_metarun(
        "eval",
        f"checkpoint={run}",
        "tasks=10",
        "steps=0,1,3",
        f"hydra.run.dir={tmp_path / 'e'}",
        cwd=tmp_path,
        check=True,
    ).stdout
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert [c["steps"] for c in result["curve"]] == [0, 1, 3] and "inner steps" in out
    assert all(0 <= c["accuracy"] <= 1 and c["ci95"] >= 0 for c in result["curve"])
    # a checkpoint written before the faithfulness settings existed loads with today's behaviour
    blob = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    for group, keys in (
        ("model", ("bn_scale", "adapt_bn", "head_init", "activation", "bn_eps")),
        ("dataset", ("resize", "rotate_eval", "split_sizes")),
    ):
        for key in keys:
            del blob["config"][group][key]
    old = tmp_path / "old" / "checkpoints"
    old.mkdir(parents=True)
    torch.save(blob, old / "best.pt")
    run_metarun(
        "eval",
        f"checkpoint={old / 'best.pt'}",
        "tasks=10",
        "steps=0,1,3",
        f"hydra.run.dir={tmp_path / 'e2'}",
        cwd=tmp_path,
        check=True,
    )
    assert json.loads((tmp_path / "e2" / "eval.json").read_text())["curve"] == result["curve"]
    # the headline accuracy (update_step_test=2 steps), computed in the curve's pass, is a plain
    # eval's
    run_metarun(
        "eval",
        f"checkpoint={old / 'best.pt'}",
        "tasks=10",
        f"hydra.run.dir={tmp_path / 'e3'}",
        cwd=tmp_path,
        check=True,
    )
    assert json.loads((tmp_path / "e3" / "eval.json").read_text())["accuracy"] == pytest.approx(
        result["accuracy"], abs=1e-9
    )
    bad = run_metarun("eval", f"checkpoint={run}", "steps=[1,-2]", cwd=tmp_path)
    assert bad.returncode == 2 and "steps=" in bad.stderr


# -- 5. cbfinn/maml's protocol for a short budget on this CPU: learning must not silently break ----
# What it runs: `+experiment=maml_paper/omniglot_5way_1shot` (binary 28x28 Omniglot from the copy
# inside metarun, 1,100/100/423 characters, rotations in training and testing, offset-only batch
# norm that the inner loop does not adapt, N(0, 1) head, one inner step of 0.4, sum-over-shot
# support loss, second order) with a reduced budget: model.filters=32, meta_batch=8, 600 iterations,
# seed 0, threads as pytest's; then the learning curve on 300 fixed (rotated) test tasks, eval_seed
# 1234, after 0, 1 and 3 inner steps. Measured once (2026-11-29, this project's 2-core CPU) with
#   cd tests && PYTHONPATH=.. python -c "from test_presets import *;
# print(short_protocol_run(**SHORT_RUN))" after 600 iterations: steps 0: 20.2% ± 1.5%, 1: 56.0% ±
# 2.6%, 3: 60.4% ± 2.7%; after 300 iterations: 18.1%, 41.3%, 53.5%; untrained (0 iterations): 19.4%,
# 26.6%, 49.0%. So a learner that stops meta-learning stays near 27% after one step (the step it is
# trained for) and fails.
SHORT_RUN = dict(filters=32, meta_batch=8, iterations=600, tasks=300)
MEASURED = {1: 0.560, 3: 0.604}  # accuracy after 1 and 3 steps, from the measurement above
MARGIN = 0.08


def short_protocol_run(filters, meta_batch, iterations, tasks, *overrides):
    """[(accuracy, ci95)] after 0, 1, 3 inner steps; `overrides`: further settings (to measure one
    setting's effect)."""
    from metarun.algorithms.base import meta_train_step
    from metarun.runner.evaluate import evaluate_curve
    from metarun.runner.setup import build_algorithm, load_splits, train_sampler

    cache = os.environ.get("METARUN_TEST_CACHE") or str(REPO / ".pytest_cache" / "omniglot")
    cfg = compose(
        "experiment=maml_paper/omniglot_5way_1shot",
        f"model.filters={filters}",
        f"meta_batch={meta_batch}",
        f"iterations={iterations}",
        "dataset.source=embedded",
        f"dataset.cache_dir={cache}",
        *overrides,
    )
    device = torch.device("cpu")
    _, algo = build_algorithm(cfg, device)
    splits = load_splits(cfg, device)["splits"]
    params = {
        k: v.requires_grad_(True)
        for k, v in algo.init_meta_params(torch.Generator().manual_seed(int(cfg.seed))).items()
    }
    optimizer = torch.optim.Adam(params.values(), lr=float(cfg.meta_lr))
    sampler = train_sampler(cfg, splits["train"], device)
    for it in range(iterations):
        algo.begin_iteration(it, optimizer)
        meta_train_step(algo, params, optimizer, sampler.sample(meta_batch))
    return evaluate_curve(algo, params, splits["test"], "test", cfg, device, tasks, [0, 1, 3])


def test_short_run_of_the_papers_protocol_learns_as_measured():
    curve = short_protocol_run(**SHORT_RUN)
    if os.environ.get("METARUN_FAITHFULNESS_REPORT"):
        print(
            "\n"
            + ", ".join(
                f"steps {s}: {100 * m:.1f}% ± {100 * c:.1f}%"
                for s, (m, c) in zip([0, 1, 3], curve, strict=True)
            )
        )
    assert (
        abs(curve[0][0] - 0.2) < 0.05
    )  # unadapted: chance (the labels are a random permutation per task)
    for steps, (mean, _) in zip([1, 3], curve[1:], strict=True):
        assert mean >= MEASURED[steps] - MARGIN, (
            f"after {steps} steps {mean:.3f} < measured {MEASURED[steps]}"
        )
    assert curve[2][0] >= curve[1][0] - 0.02  # more steps do not hurt (the paper evaluates with 3)


def test_reptile_refuses_frozen_batch_norm():
    """Reptile's outer step moves phi along what its inner loop trained: frozen batch norm would
    never learn."""
    from metarun.algorithms.reptile import Reptile
    from metarun.errors import MetarunError

    with pytest.raises(MetarunError, match="algorithm=reptile .* model.adapt_bn=true"):
        Reptile(Conv4(3, filters=4, image_size=16, adapt_bn=False), 0.001, 2, 2)
    Reptile(Conv4(3, filters=4, image_size=16), 0.001, 2, 2)  # the default is fine


# -- 6. The other presets against the authors' code ------------------------------------------------
# cbfinn/maml's MiniImagenet cells (main.py usage lines L16-20 and L245-249, maml.py L147-148 and
# L185-221, utils.py L39-58); the 5-shot meta-batch is the paper's 2 (Appendix A.1), its usage line
# says 4.
MINIIMAGENET = {
    "algorithm.name": "maml",
    "algorithm.inner_loss": "sum_over_shot",
    "dataset.name": "miniimagenet",
    "dataset.image_size": 84,
    "way": 5,
    "query": 15,
    "update_lr": 0.01,
    "update_step": 5,
    "update_step_test": 10,
    "meta_lr": 0.001,
    "meta_grad_clip": 10,
    "iterations": 60000,
    "first_order": False,
    "test_tasks": 600,
    "model.filters": 32,
    "model.downsample": "maxpool",
    "model.bn_scale": False,
    "model.adapt_bn": False,
    "model.head_init": "xavier",
    "model.activation": "relu",
    "model.bn_eps": 1e-3,
}
# openai/supervised-reptile's README commands, models.py L10 (Adam, beta1=0; TF's beta2 and epsilon)
# and L30 (one inner Adam for the run); the commands without --transductive.
REPTILE_CODE = {
    "algorithm.name": "reptile",
    "algorithm.inner_optimizer": "adam",
    "algorithm.adam_beta1": 0.0,
    "algorithm.adam_beta2": 0.999,
    "algorithm.adam_eps": 1e-8,
    "algorithm.inner_state": "shared",
    "algorithm.train_shots": 10,
    "algorithm.meta_step": 1.0,
    "algorithm.meta_step_final": 0.0,
    "algorithm.transductive": False,
    "shot": 1,
    "query": 1,
    "meta_batch": 5,
    "update_step_test": 50,
    "dataset.rotate": True,
}
# Li et al. 2017: a mean task loss (Sec. 3.1), alpha ~ U[0.005, 0.1], one inner step.
METASGD_PAPER = {
    "algorithm.name": "metasgd",
    "algorithm.inner_loss": "mean",
    "algorithm.alpha_init_low": 0.005,
    "algorithm.alpha_init_high": 0.1,
    "update_step": 1,
    "update_step_test": 1,
}
OTHER_PRESETS = {
    "miniimagenet_5way_1shot": {**MINIIMAGENET, "shot": 1, "query_test": 1, "meta_batch": 4},
    "miniimagenet_5way_5shot": {**MINIIMAGENET, "shot": 5, "query_test": 5, "meta_batch": 2},
    "reptile_omniglot_5way_1shot": {
        **REPTILE_CODE,
        "way": 5,
        "update_lr": 0.001,
        "update_step": 5,
        "iterations": 100000,
        "algorithm.inner_batch": 10,
        "algorithm.eval_inner_batch": 5,
    },
    "reptile_omniglot_20way_1shot": {
        **REPTILE_CODE,
        "way": 20,
        "update_lr": 0.0005,
        "update_step": 10,
        "iterations": 200000,
        "algorithm.inner_batch": 20,
        "algorithm.eval_inner_batch": 10,
    },
    "metasgd_omniglot_5way_1shot": {**METASGD_PAPER, "way": 5, "meta_batch": 32},
    "metasgd_omniglot_20way_1shot": {**METASGD_PAPER, "way": 20, "meta_batch": 16},
    # the json's algorithm settings on metarun's defaults for the rest, short runs fitted
    "mamlpp_omniglot_5way_1shot": {
        **{k: v for k, v in MAMLPP_PAPER.items() if not k.startswith(("model.", "dataset."))},
        "algorithm.fit_schedule": True,
        "val_tasks": 300,
        "model.activation": "relu",
        "model.bn_eps": 1e-3,
        "dataset.split_sizes": [1100, 100],
        "dataset.resize": "lanczos",
    },
}


@pytest.mark.parametrize("preset", sorted(OTHER_PRESETS))
def test_other_preset_composes_to_the_authors_values(preset):
    cfg = compose(f"experiment={preset}")
    got = {k: OmegaConf.select(cfg, k) for k in OTHER_PRESETS[preset]}
    got = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in got.items()}
    assert got == OTHER_PRESETS[preset]


def test_meta_gradient_clipping_is_exact():
    """meta_grad_clip=c: the optimizer steps on each meta-gradient element clipped to [-c, c]
    (cbfinn/maml's tf.clip_by_value), elements inside the range unchanged; the Adam step is the one
    on the clipped gradient."""
    from metarun.algorithms.base import meta_train_step

    model = Conv4(3, filters=4, image_size=16, bn_scale=False, adapt_bn=False)
    ep = random_episodes(tasks=2, way=3, shot=1, query=2, seed=5)
    params = model.init_params(torch.Generator().manual_seed(0), dtype=torch.float64)
    unclipped = MAML(model, 0.4, 1, 1, impl="batched")
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    unclipped.accumulate_meta_gradient(leaves, ep)
    grads = {k: v.grad.clone() for k, v in leaves.items()}
    bound = (
        grads["fc.weight"].abs().median().item()
    )  # about half of the head's elements are clipped
    clipped = {k: g.clamp(-bound, bound) for k, g in grads.items()}
    assert any(not torch.equal(clipped[k], grads[k]) for k in grads)
    maml = MAML(model, 0.4, 1, 1, impl="batched", meta_grad_clip=bound)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = maml.make_optimizer(list(leaves.values()), 1e-3)
    meta_train_step(maml, leaves, optimizer, ep)
    assert all(torch.equal(leaves[k].grad, clipped[k]) for k in leaves)
    # the same Adam step, by hand on the clipped gradient
    manual = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    adam = torch.optim.Adam(list(manual.values()), lr=1e-3)
    for k, v in manual.items():
        v.grad = clipped[k].clone()
    adam.step()
    assert all(torch.equal(leaves[k].detach(), manual[k].detach()) for k in leaves)


def test_bad_meta_grad_clip_is_refused():
    from metarun.errors import MetarunError

    for value in (0, -1.0, float("inf"), True):
        with pytest.raises(MetarunError, match="meta_grad_clip="):
            MAML(Conv4(3, filters=4, image_size=16), 0.4, 1, 1, meta_grad_clip=value)


def maxpool_reference_forward(p, x):
    """cbfinn/maml's MiniImagenet network for one task, written out: 3x3 conv (padding 1) -> batch
    norm with an offset only (batch statistics, eps 1e-3) -> ReLU -> 2x2 max-pool, four times;
    flatten."""
    h = x
    for i in range(4):
        h = F.conv2d(h, p[f"conv{i}.weight"], p[f"conv{i}.bias"], padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        h = F.max_pool2d(
            F.relu((h - mean) / torch.sqrt(var + 1e-3) + p[f"bn{i}.bias"].view(1, -1, 1, 1)), 2
        )
    return h.flatten(1) @ p["fc.weight"].t() + p["fc.bias"]


@pytest.mark.parametrize("impl", ["batched", "parallel"])
def test_miniimagenet_learner_meta_gradient_equals_reference(impl):
    """The miniImageNet preset's learner (max-pooling, batch-norm offset only and not adapted, a
    flattened last map) against a per-task reference of cbfinn/maml's network, second order,
    float64."""
    way, steps, lr = 3, 2, 0.01
    model = Conv4(
        way,
        in_channels=3,
        filters=4,
        image_size=20,
        downsample="maxpool",
        bn_scale=False,
        adapt_bn=False,
    )
    maml = MAML(model, lr, steps, steps, impl=impl, workers=2 if impl == "parallel" else 0)
    params = model.init_params(torch.Generator().manual_seed(3), dtype=torch.float64)
    assert "bn0.weight" not in params and params["fc.weight"].shape == (way, 4 * 1 * 1)
    g = torch.Generator().manual_seed(4)
    x_s, x_q = (
        torch.rand(3, n, 3, 20, 20, generator=g, dtype=torch.float64) for n in (way, 2 * way)
    )
    y_s, y_q = torch.arange(way).expand(3, way), torch.arange(way).repeat(2).expand(3, 2 * way)
    ep = type(random_episodes(tasks=1, way=way, shot=1, query=1))(
        x_s, y_s.clone(), x_q, y_q.clone()
    )
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    maml.accumulate_meta_gradient(leaves, ep)
    got = {k: v.grad for k, v in leaves.items()}
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    losses = []
    for t in range(3):
        fast = dict(ref)
        for _ in range(steps):
            loss = F.cross_entropy(maxpool_reference_forward(fast, x_s[t]), y_s[t], reduction="sum")
            adapt = [k for k in fast if not k.startswith("bn")]
            grads = torch.autograd.grad(loss, [fast[k] for k in adapt], create_graph=True)
            fast = {**fast, **{k: fast[k] - lr * g for k, g in zip(adapt, grads, strict=True)}}
        losses.append(F.cross_entropy(maxpool_reference_forward(fast, x_q[t]), y_q[t]))
    expected = dict(
        zip(ref, torch.autograd.grad(torch.stack(losses).mean(), list(ref.values())), strict=True)
    )
    assert relative_error(got, expected) < 1e-10
    assert all(got[k].abs().sum() > 0 for k in model.bn_names())


def test_query_test_sizes_the_scored_tasks_only():
    """query_test: the validation and test tasks' query images per class (cbfinn/maml: 15 in
    training, K at test on miniImageNet); null is the training query, as before the setting
    existed."""
    from helpers import labelled_classes

    from metarun.errors import MetarunError
    from metarun.runner.evaluate import eval_query, evaluate_tasks

    scored = []

    class Recorder:  # stands in for an algorithm: records the episodes it is asked to score
        def evaluate(self, params, ep, steps):
            scored.append(ep)
            return torch.ones(ep.x_query.shape[0])

    base = {"way": 4, "shot": 1, "query": 3, "eval_seed": 7, "eval_chunk": 6, "dataset": {}}
    for query_test, per_class in ((None, 3), (1, 1)):
        scored.clear()
        cfg = OmegaConf.create({**base, "query_test": query_test})
        evaluate_tasks(Recorder(), {}, labelled_classes(), "test", cfg, "cpu", tasks=6)
        assert {tuple(ep.y_query.shape) for ep in scored} == {(6, 4 * per_class)}
    assert eval_query(OmegaConf.create(base)) == 3  # a config from before the setting
    with pytest.raises(MetarunError, match="query_test=0"):
        eval_query(OmegaConf.create({**base, "query_test": 0}))


def test_query_test_in_a_run_and_its_eval(tiny_root, tmp_path):
    run = tmp_path / "run"
    run_metarun(*tiny_args(tiny_root, run, "query=2", "query_test=1"), cwd=tmp_path, check=True)
    run_metarun(
        "eval",
        f"checkpoint={run}",
        "tasks=4",
        f"data_root={tiny_root}",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
        check=True,
    )
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["query"] == 1
    too_many = run_metarun(*tiny_args(tiny_root, tmp_path / "r2", "query_test=25"), cwd=tmp_path)
    from helpers import assert_clean_error

    assert_clean_error(too_many, "shot+query=1+25")
