"""The regression task family (metarun/tasks.py) on the MAML paper's sinusoid: data, MLP learner,
meta-gradient, presets, refusals, pictures, report and packaging."""

import json
import math
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, run_metarun
from omegaconf import OmegaConf

from metarun import report
from metarun.algorithms.anil import ANIL
from metarun.algorithms.maml import MAML
from metarun.algorithms.metasgd import MetaSGD
from metarun.data.sinusoid import load_sinusoid
from metarun.errors import MetarunError
from metarun.models.mlp import MLP
from metarun.runner.state import TrainState
from metarun.tasks import CLASSIFICATION, REGRESSION

SINE = {"amp_range": [0.1, 5.0], "phase_range": [0.0, 3.14159], "input_range": [-5.0, 5.0]}


def sine_episodes(tasks=4, shot=5, query=5, seed=0, dtype=torch.float64):
    splits, _ = load_sinusoid(OmegaConf.create(SINE))
    g = torch.Generator().manual_seed(seed)
    ep = splits["train"].draw(tasks, shot, query, g)
    for f in ("x_support", "y_support", "x_query", "y_query"):
        setattr(ep, f, getattr(ep, f).to(dtype))
    return ep


def per_task_meta_loss(algorithm, params, ep, steps):
    """One task at a time, plain F.linear: the MSE after `steps` SGD steps on the support points."""
    names = ["hidden0", "hidden1", "fc"]

    def net(w, x):
        h = x
        for i, n in enumerate(names):
            h = F.linear(h, w[f"{n}.weight"], w[f"{n}.bias"])
            h = F.relu(h) if i < len(names) - 1 else h
        return h

    losses = []
    for t in range(ep.x_support.shape[0]):
        fast = dict(params)
        adapted = algorithm.adapted_names(params)
        for step in range(steps):
            loss = F.mse_loss(net(fast, ep.x_support[t]), ep.y_support[t])
            grads = torch.autograd.grad(
                loss, [fast[k] for k in adapted], create_graph=algorithm.second_order()
            )
            lrs = algorithm.inner_lrs(params, step)
            for k, g in zip(adapted, grads, strict=False):
                fast[k] = fast[k] - (lrs[k] if isinstance(lrs, dict) else lrs) * g
        losses.append(F.mse_loss(net(fast, ep.x_query[t]), ep.y_query[t]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize(
    "make",
    [
        lambda m: MAML(m, 0.01, 1, 10, impl="batched"),
        lambda m: MAML(m, 0.01, 2, 10, first_order=True, impl="batched"),
        lambda m: MetaSGD(m, 0.01, 1, 10, impl="batched"),
        lambda m: ANIL(m, 0.01, 1, 10, impl="batched", head_layer="fc"),
    ],
    ids=["maml", "fomaml-2-steps", "metasgd", "anil"],
)
def test_regression_meta_gradient_matches_the_per_task_reference(make):
    model = MLP(init_std=0.5)  # larger than cbfinn's 0.01 so that every term is far from zero
    algorithm = make(model)
    algorithm.bind_family(REGRESSION)
    params = algorithm.init_meta_params(torch.Generator().manual_seed(0), dtype=torch.float64)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    ep = sine_episodes()
    result = algorithm.accumulate_meta_gradient(params, ep)
    expected = per_task_meta_loss(algorithm, params, ep, algorithm.update_step)
    want = torch.autograd.grad(expected, list(params.values()), allow_unused=True)
    assert torch.allclose(result.meta_loss, expected.detach(), rtol=1e-10)
    for (k, p), w in zip(params.items(), want, strict=False):
        w = torch.zeros_like(p) if w is None else w
        assert torch.allclose(p.grad, w, rtol=1e-8, atol=1e-12), k
    # the metric of a regression step is the per-task query MSE, not an accuracy
    assert result.accuracy.shape == (4,) and float(result.accuracy.min()) > 0


def test_fixed_tasks_depend_only_on_seed_split_and_index():
    splits, _ = load_sinusoid(OmegaConf.create(SINE))
    cfg = OmegaConf.create({"shot": 5, "query": 5})
    a = torch.cat([e.amp for e in splits["test"].fixed_tasks(cfg, "cpu", 10, 1234, 3)])
    b = torch.cat([e.amp for e in splits["test"].fixed_tasks(cfg, "cpu", 4, 1234, 4)])
    val = torch.cat([e.amp for e in splits["val"].fixed_tasks(cfg, "cpu", 4, 1234, 4)])
    assert torch.equal(a[:4], b)
    assert not torch.equal(a[:4], val)
    assert float(a.min()) >= 0.1 and float(a.max()) <= 5.0


def test_a_run_whose_validations_all_diverge_keeps_last_pt_and_says_how_to_score_it(tmp_path):
    """update_step_test=60 steps of 5.0 diverge (inf or nan MSE) while training's one step does
    not: a warning names the cause, no diverged validation becomes best or top, and the end is one
    line that keeps last.pt and gives an eval command that scores it."""
    run = tmp_path / "run"
    settings = ["iterations=20", "eval_every=10", "val_tasks=4", "test_tasks=4", "update_lr=5"]
    proc = run_metarun(
        "train", "experiment=sinusoid_10shot", *settings, "update_step_test=60", "threads=1",
        f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("the validation MSE is not finite") == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("metarun: error:")]
    assert len(errors) == 1 and "no validation of this run gave a finite MSE" in errors[0]
    last = run / "checkpoints" / "last.pt"
    assert last.is_file() and not (run / "checkpoints" / "best.pt").exists()
    assert not list((run / "checkpoints").glob("top/*.pt")) and not (run / "results.json").exists()
    command = errors[0].split("Score it with fewer inner steps: ")[1].split()
    assert command[:2] == ["metarun", "eval"] and command[2] == f"checkpoint={last}"
    scored = run_metarun(
        *command[1:], "tasks=4", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path
    )
    assert scored.returncode == 0, scored.stderr[-2000:]
    curve = json.loads((tmp_path / "eval" / "eval.json").read_text())["curve"]
    assert [p["steps"] for p in curve] == [0, 1, 2, 3, 4, 5]
    assert math.isfinite(curve[0]["mse"])  # the meta-learned weights themselves are fine


def test_a_diverged_validation_never_ranks():
    state = TrainState(iteration=0, params={}, config={}, top=[[0.5, 100]])
    assert state.rank_top(float("nan"), 200, 2, REGRESSION) == [] and state.top == [[0.5, 100]]
    assert state.rank_top(float("inf"), 300, 2, REGRESSION) == [] and state.top == [[0.5, 100]]


def test_regression_family_ranks_lower_first():
    assert REGRESSION.better(0.3, 0.5) and not REGRESSION.better(0.5, 0.3)
    assert CLASSIFICATION.better(0.9, 0.8)
    state = TrainState(iteration=0, params={}, config={}, top=[[0.5, 100], [0.2, 200]])
    dropped = state.rank_top(0.3, 300, 2, REGRESSION)
    assert state.top == [[0.2, 200], [0.3, 300]] and dropped == [[0.5, 100]]
    assert REGRESSION.objective(0.25) == -0.25  # what Optuna (maximize) gets
    assert REGRESSION.worst == float("inf")


@pytest.mark.parametrize(
    "preset, algorithm, shot",
    [
        ("sinusoid_5shot", "maml", 5),
        ("sinusoid_10shot", "maml", 10),
        ("sinusoid_20shot", "maml", 20),
        ("sinusoid/metasgd_10shot", "metasgd", 10),
        ("sinusoid/joint_10shot", "joint", 10),
    ],
)
def test_every_sinusoid_preset_composes_and_builds(preset, algorithm, shot):
    """The paper's protocol in each preset: one inner step of 0.01 in training, 10 at test, the
    MLP learner; the algorithm it names builds on the regression family."""
    from hydra import compose, initialize_config_dir

    from metarun import cli
    from metarun.runner.setup import build_algorithm, check_train_settings

    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        cfg = compose("train", [f"experiment={preset}"])
    check_train_settings(cfg)
    assert (cfg.dataset.name, cfg.model.name, cfg.shot) == ("sinusoid", "mlp", shot)
    test_steps = 1 if algorithm == "metasgd" else 10  # Meta-SGD's alpha is a one-step rate
    assert (cfg.update_step, cfg.update_step_test, cfg.update_lr) == (1, test_steps, 0.01)
    _, algo = build_algorithm(cfg, torch.device("cpu"))
    assert algo.name == algorithm and algo.family is REGRESSION


@pytest.mark.parametrize("algorithm", ["reptile", "mamlpp", "pretrain"])
def test_classification_only_algorithms_refuse_regression(algorithm):
    from hydra import compose, initialize_config_dir

    from metarun import cli
    from metarun.runner.setup import build_algorithm

    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        cfg = compose(
            "train",
            ["experiment=sinusoid_10shot", f"algorithm={algorithm}", "algorithm.impl=batched"],
        )
    with pytest.raises(MetarunError) as err:
        build_algorithm(cfg, torch.device("cpu"))
    assert "\n" not in str(err.value) and f"algorithm={algorithm}" in str(err.value)
    assert "regression" in str(err.value)


def test_preset_trains_evaluates_plots_and_reports(tmp_path):
    run = tmp_path / "run"
    proc = run_metarun(
        "train",
        "experiment=sinusoid_5shot",
        "threads=1",
        "iterations=6",
        "eval_every=3",
        "val_tasks=4",
        "test_tasks=5",
        "meta_batch=3",
        "log_every=3",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    results = json.loads((run / "results.json").read_text())
    assert results["metric"] == "mse" and results["test_mse"] > 0
    assert "best_val_mse" in results and "test_accuracy" not in results
    assert "test MSE" in proc.stdout
    out = tmp_path / "eval"
    run_metarun(
        "eval",
        f"checkpoint={run}",
        "steps=0,1,10",
        "tasks=5",
        "plot=true",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    record = json.loads((out / "eval.json").read_text())
    assert [p["steps"] for p in record["curve"]] == [0, 1, 10] and "mse" in record["curve"][0]
    assert (out / "eval.png").stat().st_size > 1000
    text, where = report.report([run, out], tmp_path / "rep", plot=True)
    assert "MSE (lower is better)" in text and "accuracy" not in text.split("\n")[0]
    assert (where / "validation.png").is_file() and (where / "inner_steps.png").is_file()


def test_report_has_a_lower_is_better_column_beside_accuracies(tmp_path):
    def write(name, dataset, metric, value):
        d = tmp_path / name
        d.mkdir()
        config = {"way": 5, "shot": 10, "dataset": {"name": dataset}, "algorithm": {"name": "maml"}}
        record = {
            "status": "completed",
            "config": config,
            "metric": metric,
            f"test_{metric}": value,
            "test_ci95": 0.01,
            "test_tasks": 600,
        }
        (d / "results.json").write_text(json.dumps(record))

    write("sine", "sinusoid", "mse", 0.4567)
    write("omni", "omniglot", "accuracy", 0.987)
    text, _ = report.report([tmp_path], tmp_path / "rep")
    rows = {line.split("|")[3].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.4567 ± 0.0100" in rows["MSE (lower is better)"]
    assert "98.70 ± 1.00" in rows["accuracy (higher is better)"]
    assert "lower is better" in text.split("Cells:")[1]


def test_pictures_without_matplotlib_are_one_line_errors(monkeypatch, tmp_path):
    from metarun.plots import check_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(MetarunError) as err:
        check_plot(REGRESSION, {})
    assert "\n" not in str(err.value) and "metarun[plot]" in str(err.value)
    with pytest.raises(MetarunError, match="metarun\\[plot\\]"):
        report.main([str(tmp_path), "--plot"])
    with pytest.raises(MetarunError, match="regression"):
        check_plot(CLASSIFICATION, {})


def test_the_wheel_carries_the_sinusoid_configs(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("metarun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (
        "conf/dataset/sinusoid.yaml",
        "conf/model/mlp.yaml",
        "conf/experiment/sinusoid_10shot.yaml",
        "conf/experiment/sinusoid/joint_10shot.yaml",
        "conf/algorithm/joint.yaml",
    ):
        assert f"metarun/{path}" in names, path
