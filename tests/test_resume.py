"""`metarun train resume=...` (metarun/runner/resume.py): a resume continues the run it names, with
the settings that may change applied and the others refused; damaged checkpoints are refused before
training; a resume into another run's dir is refused; SIGTERM then resume equals an uninterrupted
run."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_clean_error, ckpt, compose_train, leaves, run_metarun, tiny_args
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metarun.data.omniglot import atomic_torch_save
from metarun.errors import MetarunError
from metarun.runner import rundir
from metarun.runner.resume import RESUMABLE, resume_config


def test_bare_resume_continues_the_run_as_configured(run):
    run, before, resumed = run
    assert "resumed from" in resumed.stdout and "at iteration 3" in resumed.stdout
    blob = ckpt(run)
    assert blob["iteration"] == 6
    assert (
        blob["config"]["update_lr"] == 0.2 and blob["config"]["way"] == 3
    )  # the run's own, not the defaults'
    assert blob["config"]["iterations"] == 6 and blob["config"]["eval_every"] == 1
    # the changes are applied for real: validation every iteration after the resume
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/accuracy")] == [3, 4, 5, 6]
    # and recorded: a history in the checkpoint and in results.json
    history = blob["history"]
    assert [h["start_iteration"] for h in history] == [0, 3]
    # a longer run keeps its schedules on the length it started with (pinned, recorded)
    assert history[1]["changes"] == {
        "iterations": [3, 6],
        "eval_every": [3, 1],
        "schedule_iterations": [None, 3],
    }
    results = json.loads((run / "results.json").read_text())
    assert results["history"] == history and results["config"]["iterations"] == 6
    # 9. a resume never rewrites the run's own record of how it was started
    assert (run / ".hydra" / "config.yaml").read_bytes() == before["config"]
    assert (run / ".hydra" / "overrides.yaml").read_bytes() == before["overrides"]
    # 9. wall time is cumulative like train_seconds
    assert results["wall_seconds"] > before["results"]["wall_seconds"]
    assert results["wall_seconds"] >= results["segment_wall_seconds"] > 0
    assert results["train_seconds"] > before["results"]["train_seconds"]


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("update_lr=0.4", "update_lr=0.4 cannot change on resume"),
        ("meta_lr=0.01", "meta_lr=0.01 cannot change on resume"),
        ("experiment=omniglot_5way_1shot", "experiment=omniglot_5way_1shot chooses a config group"),
        ("iterations=2", "iterations=2 is below the iteration 6"),
    ],
)
def test_resume_refuses_changes_of_the_run(run, tmp_path, override, fragment):
    run, _, _ = run
    files = {p: p.read_bytes() for p in (run / ".hydra").iterdir()}
    last = (run / "checkpoints" / "last.pt").read_bytes()
    assert_clean_error(run_metarun("train", f"resume={run}", override, cwd=tmp_path), fragment)
    assert {p: p.read_bytes() for p in (run / ".hydra").iterdir()} == files
    assert (run / "checkpoints" / "last.pt").read_bytes() == last


def other_value(value):
    if isinstance(value, list):  # e.g. dataset.split_sizes
        return [other_value(v) for v in value]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return f"{value}-other"


def test_every_setting_is_either_resumable_and_applied_or_refused():
    """The general form: every setting of train.yaml, overridden on resume with another value."""
    saved = OmegaConf.to_container(compose_train("way=3", "update_lr=0.2"), resolve=True)
    for key, value in leaves(saved):
        if key == "resume":
            continue
        new = other_value(value)
        text = f"{key}={new}"
        requested = compose_train("resume=x", text)
        if key in RESUMABLE:
            config, changes = resume_config(saved, requested, [text], "x")
            assert OmegaConf.select(config, key) == new and changes == {key: [value, new]}, key
            assert config.way == 3 and config.update_lr == 0.2
        else:
            with pytest.raises(MetarunError, match=f"{key}=.* cannot change on resume"):
                resume_config(saved, requested, [text], "x")
        # the run's own value, repeated, is no change
        own = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        same = f"{key}={own}"
        assert resume_config(saved, compose_train(same), [same], "x")[1] == {}, same
    # the run's own config group option again is no change; another one is refused
    assert resume_config(saved, compose_train("algorithm=maml"), ["algorithm=maml"], "x")[1] == {}
    with pytest.raises(MetarunError, match="algorithm=metasgd chooses a config group"):
        resume_config(saved, compose_train("algorithm=metasgd"), ["algorithm=metasgd"], "x")
    # a setting newer than the run takes the requested value
    older = {k: v for k, v in saved.items() if k != "eval_chunk"}
    assert resume_config(older, compose_train("eval_chunk=7"), [], "x")[0].eval_chunk == 7


def test_resume_of_a_checkpoint_with_another_devices_generator_state(run, tmp_path):
    """A checkpoint written on CUDA by an older metarun carries a 16-byte Philox state; the CPU
    continues."""
    run, _, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(rundir.MARKER))
    blob = ckpt(copy)
    del blob["sampler"]
    blob["sampler_rng"] = torch.zeros(16, dtype=torch.uint8)
    atomic_torch_save(blob, copy / "checkpoints" / "last.pt")
    proc = run_metarun("train", f"resume={copy}", "iterations=7", cwd=tmp_path, check=True)
    assert "device-specific sampler state" in proc.stderr and "RuntimeError" not in proc.stderr
    assert ckpt(copy)["iteration"] == 7 and ckpt(copy)["sampler"] == {"seed": 0, "draws": 7}
    # 8. the warning is in the log file too
    assert "device-specific sampler state" in (copy / "metarun-train.log").read_text()


def test_resume_refuses_a_damaged_best_checkpoint_before_training(run, tmp_path):
    """best.pt is scored at the end of training: a resume finds a damaged one before any iteration
    runs."""
    import shutil

    run, _, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / ".metarun-run").unlink()
    blob = ckpt(copy, "best.pt")
    blob["params"]["fc.bias"][0] = float("inf")
    torch.save(blob, copy / "checkpoints" / "best.pt")
    before = (copy / "checkpoints" / "last.pt").read_bytes()
    proc = run_metarun("train", f"resume={copy}", "iterations=9", cwd=tmp_path)
    assert_clean_error(
        proc, "best.pt", "tensor 'params.fc.bias'", "checkpoints/top/*.pt or last.pt"
    )
    assert (copy / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_into_another_runs_dir_is_refused(run, tmp_path):
    run, _, _ = run
    # into a new dir a resume is a branch of the run; the original is untouched
    last = (run / "checkpoints" / "last.pt").read_bytes()
    branch = tmp_path / "branch"
    run_metarun(
        "train",
        f"resume={run}",
        "iterations=7",
        f"hydra.run.dir={branch}",
        "algorithm.impl=loop",
        cwd=tmp_path,
        check=True,
    )
    assert ckpt(branch)["iteration"] == 7 and (run / "checkpoints" / "last.pt").read_bytes() == last
    assert ckpt(branch)["history"][-1]["resumed_from"] == str(run)
    # 1. an execution setting given on resume is applied for real, not overridden by the saved
    #    execution
    assert ckpt(run)["algorithm"]["impl"] != "loop" and ckpt(branch)["algorithm"]["impl"] == "loop"
    assert ckpt(branch)["history"][-1]["changes"]["algorithm.impl"] == ["auto", "loop"]
    assert (branch / "checkpoints" / "best.pt").is_file()  # the run's best checkpoint goes with it
    # into a dir that belongs to another run (here: the branch) it is refused, and that run is
    # untouched
    files = {p: p.read_bytes() for p in branch.rglob("*") if p.is_file()}
    proc = run_metarun(
        "train", f"resume={run}", "iterations=8", f"hydra.run.dir={branch}", cwd=tmp_path
    )
    assert_clean_error(proc, f"hydra.run.dir={branch} already belongs to another run")
    # eval's output dir is claimed the same way
    assert_clean_error(
        run_metarun("eval", f"checkpoint={run}", f"hydra.run.dir={branch}", cwd=tmp_path),
        "already belongs to another run",
    )
    assert {p: p.read_bytes() for p in branch.rglob("*") if p.is_file()} == files


def test_sigterm_then_resume_equals_uninterrupted(tiny_root, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(tiny_root, run, "iterations=100000", "eval_every=100000")
    env = {k: v for k, v in os.environ.items() if k != "METARUN_DATA"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarun.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("metarun:") and "way" in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in out and f"metarun train resume={run}" in out
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"]
    assert 0 < stopped < 100000
    total = stopped + 3
    printed = out.split("Resume with: ")[1].splitlines()[
        0
    ]  # the command as printed, run as printed
    assert shlex.split(printed)[:2] == ["metarun", "train"]
    run_metarun(*shlex.split(printed)[1:], f"iterations={total}", cwd=tmp_path, check=True)
    whole = tmp_path / "whole"
    run_metarun(
        *tiny_args(tiny_root, whole, f"iterations={total}", "eval_every=100000"),
        cwd=tmp_path,
        check=True,
    )
    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == total
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
