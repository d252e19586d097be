"""Real `metarun` runs in a subprocess on a tiny generated Omniglot."""

import json

import pytest
import torch
from helpers import REPO, ckpt, compose_train, leaves, run_metarun, strip, tiny_args
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metarun import cli
from metarun.errors import MetarunError


def load_params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["params"]


def test_help_lists_commands_and_groups(tmp_path):
    top = run_metarun("--help", cwd=tmp_path, check=True)
    assert "train" in top.stdout and "eval" in top.stdout
    out = run_metarun("train", "--help", cwd=tmp_path, check=True).stdout
    groups = {
        line.split(":", 1)[0].strip(): line.split(":", 1)[1].split("[")[0]
        for line in out.splitlines()
        if line.strip().split(":", 1)[0] in ("algorithm", "dataset", "model")
    }
    for group, options in (
        ("algorithm", ("anil", "maml", "mamlpp", "metasgd", "pretrain", "reptile", "joint")),
        ("dataset", ("cifar_fs", "fc100", "folder", "miniimagenet", "omniglot", "sinusoid")),
        ("model", ("conv4", "resnet12", "mlp")),
    ):
        assert set(options) <= {o.strip() for o in groups[group].split(",")}, groups
    assert "omniglot_20way_1shot" in out and "miniimagenet_5way_1shot" in out
    job = run_metarun(
        "train", "+experiment=omniglot_20way_1shot", "--cfg", "job", cwd=tmp_path, check=True
    ).stdout
    assert (
        "way: 20" in job
        and "meta_batch: 16" in job
        and "update_lr: 0.1" in job
        and "update_step: 5" in job
    )


def test_train_then_eval(tiny_root, tmp_path):
    run = tmp_path / "run"
    proc = run_metarun(*tiny_args(tiny_root, run), cwd=tmp_path, check=True)
    assert f"run dir {run}" in proc.stdout and "test accuracy" in proc.stdout
    for name in ("last.pt", "best.pt"):
        blob = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert set(blob) >= {
            "params",
            "optimizer",
            "iteration",
            "sampler",
            "config",
            "history",
            "resolved",
        }
        assert blob["config"]["way"] == 3
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 6
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["iterations"] == 6 and 0 <= results["test_accuracy"] <= 1
    for key in ("best_val_accuracy", "test_ci95", "wall_seconds", "tasks_per_s", "train_seconds"):
        assert key in results
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/meta_loss",
        "train/accuracy",
        "val/accuracy",
        "val/ci95",
        "lr/meta_lr",
        "lr/update_lr",
        "speed/tasks_per_s",
    } <= tags
    assert [e.step for e in events.Scalars("val/accuracy")] == [3, 6]

    out = run_metarun(
        "eval",
        f"checkpoint={run}",
        "tasks=10",
        f"data_root={tiny_root}",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
        check=True,
    ).stdout
    assert "test accuracy" in out and "(95% CI, 10 tasks, 3-way 1-shot)" in out
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["tasks"] == 10 and result["checkpoint"].endswith("best.pt")
    # the same checkpoint on the same fixed tasks gives the same score
    again = run_metarun(
        "eval",
        f"checkpoint={run / 'checkpoints' / 'best.pt'}",
        "tasks=10",
        f"data_root={tiny_root}",
        f"hydra.run.dir={tmp_path / 'eval2'}",
        cwd=tmp_path,
        check=True,
    )
    assert (
        json.loads((tmp_path / "eval2" / "eval.json").read_text())["accuracy"] == result["accuracy"]
    )
    assert again.returncode == 0


def test_sweep_gives_one_run_per_setting(tiny_root, tmp_path):
    args = [
        a for a in tiny_args(tiny_root, tmp_path / "unused") if not a.startswith("hydra.run.dir")
    ]
    args = [a for a in args if not a.startswith("way=")]
    run_metarun(
        *args, "-m", "way=2,3", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, check=True
    )
    runs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/results.json"))
    assert len(runs) == 2
    ways = sorted(json.loads((r / "results.json").read_text())["config"]["way"] for r in runs)
    assert ways == [2, 3]


def test_resume_finishes_with_the_weights_of_an_uninterrupted_run(tiny_root, tmp_path):
    whole = tmp_path / "whole"
    run_metarun(*tiny_args(tiny_root, whole), cwd=tmp_path, check=True)
    parts = tmp_path / "parts"
    run_metarun(*tiny_args(tiny_root, parts, "iterations=3"), cwd=tmp_path, check=True)
    assert torch.load(parts / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 3
    proc = run_metarun(
        *[a for a in tiny_args(tiny_root, parts) if not a.startswith("hydra.run.dir")],
        f"resume={parts}",
        cwd=tmp_path,
        check=True,
    )
    assert "resumed from" in proc.stdout and "at iteration 3" in proc.stdout
    a, b = (
        load_params(whole / "checkpoints" / "last.pt"),
        load_params(parts / "checkpoints" / "last.pt"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest" in readme and "python -m pytest" in ci


# A sweep of values without -m ------------------------------------------------------------------


def test_mistyped_setting_with_a_list_of_values_is_an_unknown_setting(tiny_root, tmp_path):
    from helpers import assert_clean_error

    train = tiny_args(tiny_root, tmp_path / "run")
    assert_clean_error(
        run_metarun(*train, "itertions=50,100", cwd=tmp_path), "unknown setting 'itertions'"
    )
    assert_clean_error(
        run_metarun("eval", f"checkpoint={tmp_path}", "stepz=0,1", cwd=tmp_path),
        "unknown setting 'stepz'",
    )
    # a known setting with several values: a sweep needs -m, a list needs brackets
    assert_clean_error(
        run_metarun(*train, "seed=0,1", cwd=tmp_path), "seed=0,1", "-m", "seed=[0,1]"
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("key", cli.PATH_SETTINGS)
@pytest.mark.parametrize("quote", ["", "'", '"'])
def test_tilde_means_home_in_every_path_setting(key, quote, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    out = cli._normalize(f"{key}={quote}~/runs/a b{quote}")
    assert out == f"{key}={cli._quote(str(tmp_path / 'runs' / 'a b'))}"
    cli._parse("train", [out])  # Hydra's grammar reads it
    assert cli._normalize(f"{key}=runs/x") == f"{key}=runs/x"
    with pytest.raises(MetarunError, match="not a user's home folder"):
        cli._normalize(f"{key}=~no-such-user-xyz/runs")


def test_tilde_paths_from_the_cli(tiny_root, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "data").symlink_to(tiny_root)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"HOME": str(home)}
    args = strip(
        tiny_args(tiny_root, tmp_path, "iterations=2", "eval_every=2"), "hydra.run.dir", "dataset."
    )
    run_metarun(
        *args,
        "hydra.run.dir=~/runs/x",
        "dataset.root=~/data",
        "dataset.cache_dir='~/cache'",
        cwd=cwd,
        env_extra=env,
        check=True,
    )
    assert (
        ckpt(home / "runs" / "x")["iteration"] == 2
        and (home / "cache" / "omniglot_28.pt").is_file()
    )
    run_metarun("train", "resume=~/runs/x", "iterations=3", cwd=cwd, env_extra=env, check=True)
    run_metarun(
        "eval",
        "checkpoint=~/runs/x",
        "data_root=~/data",
        "tasks=3",
        "hydra.run.dir=~/ev",
        cwd=cwd,
        env_extra=env,
        check=True,
    )
    assert (home / "ev" / "eval.json").is_file()
    run_metarun(
        *args,
        "-m",
        "seed=1",
        "hydra.sweep.dir=~/sw",
        "dataset.root=~/data",
        cwd=cwd,
        env_extra=env,
        check=True,
    )
    assert json.loads((home / "sw" / "0" / "results.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in cwd.iterdir()) == []  # no folder named `~`, nothing else either


@pytest.mark.parametrize(
    "name",
    sorted(
        str(p.relative_to(REPO / "conf" / "experiment").with_suffix(""))
        for p in (REPO / "conf" / "experiment").rglob("*.yaml")
    ),
)
def test_experiment_group_without_plus(name):
    plain = compose_train(cli._normalize(f"experiment={name}"))
    plus = compose_train(cli._normalize(f"+experiment={name}"))
    expected = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "experiment" / f"{name}.yaml"))
    expected.pop("defaults", None)
    assert plain == plus and all(OmegaConf.select(plain, k) == v for k, v in leaves(expected))


def test_experiment_group_without_plus_from_the_cli(tmp_path):
    out = run_metarun(
        "train", "experiment=omniglot_20way_1shot", "--cfg", "job", cwd=tmp_path, check=True
    ).stdout
    assert "way: 20" in out and "meta_batch: 16" in out
