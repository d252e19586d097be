"""The run state (metarun/runner/state.py): its dict form is the checkpoint format; every version
metarun wrote still loads, resumes and evaluates (a real version-1 run in tests/fixtures/)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_error, run_metarun

from metarun.errors import MetarunError
from metarun.runner.checkpoint import load_checkpoint, load_state, save_checkpoint
from metarun.runner.state import FORMAT, TrainState, format_version

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"


def example_state() -> TrainState:
    return TrainState(
        iteration=7,
        params={"w": torch.arange(6.0).view(2, 3), "lslr.w": torch.ones(2)},
        config={"way": 3, "algorithm": {"name": "maml"}},
        optimizer={"state": {0: {"step": torch.tensor(7.0)}}, "param_groups": [{"lr": 0.1}]},
        sampler={"seed": 0, "draws": 7},
        best_val=0.5,
        best_iteration=6,
        top=[[0.5, 6], [0.25, 2]],
        train_seconds=1.5,
        wall_seconds=3.0,
        history=[{"start_iteration": 0, "overrides": ["way=3"]}],
        resolved={"device": "cpu"},
        algorithm={"name": "maml", "impl": "batched", "workers": 1},
    )


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    state = example_state()
    save_checkpoint(tmp_path / "x.pt", state)
    blob = torch.load(tmp_path / "x.pt", weights_only=True)
    assert blob["format"] == FORMAT and format_version(blob) == 2
    back = TrainState.from_dict(blob)
    for name in ("iteration", "config", "sampler", "best_val", "best_iteration", "top"):
        assert getattr(back, name) == getattr(state, name), name
    assert back.history == state.history and back.algorithm == state.algorithm
    assert all(torch.equal(back.params[k], state.params[k]) for k in state.params)
    assert back.metarun_version == __import__("metarun").__version__


def test_every_checkpoint_key_is_documented():
    """The schema's documentation (the docs render TrainState's docstring) names every key."""
    doc = TrainState.__doc__
    for key in example_state().to_dict():
        if key != "format":
            assert f"\n        {key}: " in doc, key


def test_a_version_1_checkpoint_loads_as_a_state():
    state = load_state(FIXTURE / "run" / "checkpoints" / "last.pt", "resume")
    assert state.iteration == 4 and state.metarun_version is None
    assert state.sampler == {"seed": 0, "draws": 4}
    assert [i for _, i in state.top] == [4, 2] and state.best_iteration == 4
    assert state.config["model"]["filters"] == 4 and state.algorithm["impl"] == "batched"


def test_an_unknown_format_version_is_refused(tmp_path):
    blob = example_state().to_dict()
    blob["format"] = "metarun-checkpoint-v99"
    torch.save(blob, tmp_path / "future.pt")
    with pytest.raises(MetarunError, match="is not a metarun checkpoint"):
        load_checkpoint(tmp_path / "future.pt", "checkpoint")


@pytest.fixture
def v1_run(tmp_path) -> Path:
    run = tmp_path / "v1run"
    shutil.copytree(FIXTURE / "run", run)
    return run


def test_a_version_1_run_resumes_as_it_did_before_and_evaluates(v1_run, tiny_root, tmp_path):
    data = [f"dataset.root={tiny_root}", f"dataset.cache_dir={tiny_root / 'cache'}"]
    run_metarun(
        "train", f"resume={v1_run}", "iterations=6", "threads=1", *data, cwd=tmp_path, check=True
    )
    after = torch.load(v1_run / "checkpoints" / "last.pt", weights_only=True)
    # what the metarun that wrote the fixture made of the same resume (tests/fixtures/.../README.md)
    before = torch.load(FIXTURE / "resumed_to_6.pt", weights_only=True)
    assert after["format"] == FORMAT and after["iteration"] == before["iteration"] == 6
    assert after["sampler"] == before["sampler"]
    assert [i for _, i in after["top"]] == [i for _, i in before["top"]]
    for k, v in before["params"].items():  # the same steps; another CPU may round differently
        assert torch.allclose(after["params"][k], v, rtol=0, atol=1e-5), k
    results = json.loads((v1_run / "results.json").read_text())
    assert results["status"] == "completed" and [
        h["start_iteration"] for h in results["history"]
    ] == [
        0,
        4,
    ]
    assert results["command"].startswith("metarun train way=3 shot=1 query=2")


def test_a_version_1_checkpoint_evaluates_to_its_recorded_test_score(v1_run, tiny_root, tmp_path):
    proc = run_metarun(
        "eval",
        f"checkpoint={v1_run}",
        "tasks=4",
        f"data_root={tiny_root}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
        check=True,
    )
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    recorded = json.loads((FIXTURE / "run" / "results.json").read_text())
    assert record["iteration"] == 4 and "test accuracy" in proc.stdout
    assert record["accuracy"] == pytest.approx(recorded["test_accuracy"], abs=1e-9)


def test_a_checkpoint_that_cannot_be_resumed_is_one_line(tmp_path):
    blob = torch.load(FIXTURE / "run" / "checkpoints" / "best.pt", weights_only=True)
    partial = {k: blob[k] for k in ("format", "iteration", "params", "config")}
    torch.save(partial, tmp_path / "weights-only.pt")
    proc = run_metarun(
        "train",
        f"resume={tmp_path / 'weights-only.pt'}",
        f"hydra.run.dir={tmp_path / 'branch'}",
        cwd=tmp_path,
    )
    assert_clean_error(proc, "weights-only.pt holds no 'optimizer'", "metarun eval")
    assert not (tmp_path / "branch").exists()
