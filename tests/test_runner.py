"""The training loop (metarun/runner/train.py and its phases): signals honoured wherever the run is
(between iterations, in a validation, in the final test), one way out that closes everything, one
TensorBoard HParams record per run, results.json saying how the run was made."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    assert_clean_error,
    ckpt,
    run_metarun,
    settings,
    tiny_args,
    train_in_process,
)

import metarun
from metarun.data.omniglot import atomic_torch_save
from metarun.runner import train as train_module

RUNNER = REPO / "metarun" / "runner"


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


# 1. The loop in phases ----------------------------------------------------------------------------


def test_no_runner_function_is_longer_than_a_screen():
    long = []
    for path in sorted(RUNNER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long, long


@pytest.mark.parametrize("way_out", ["results", "error", "signal"])
def test_every_way_out_closes_the_bar_and_tensorboard(tiny_root, tmp_path, monkeypatch, way_out):
    """One exit path: whether the run finishes, fails (diverged weights) or is stopped, the progress
    bar and the TensorBoard writer are closed and the signal handlers restored."""
    runs = []
    real_build = train_module.build
    monkeypatch.setattr(train_module, "build", lambda *a: runs.append(real_build(*a)) or runs[-1])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    real_step = train_module.meta_train_step

    def step(algorithm, params, optimizer, batch):
        result = real_step(algorithm, params, optimizer, batch)
        if way_out == "error":
            with torch.no_grad():
                params["fc.bias"][0] = float("nan")
        elif way_out == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train_module, "meta_train_step", step)
    if way_out == "results":
        train_in_process(tiny_root, tmp_path, "iterations=2", "eval_every=2")
    else:
        with pytest.raises((SystemExit, metarun.errors.MetarunError)):
            train_in_process(tiny_root, tmp_path, "iterations=2", "eval_every=2")
    run = runs[0]
    assert run.bar.disable  # tqdm.close() sets it (rank 0's bar starts enabled)
    assert run.bar not in getattr(type(run.bar), "_instances", set())
    assert run.writer.all_writers is None  # SummaryWriter.close() was called
    assert {s: signal.getsignal(s) for s in handlers} == handlers


# 2. Signals wherever the run is (issue 22, case 6) ------------------------------------------------


def test_sigterm_during_the_final_test_stops_keeps_the_checkpoints_and_resumes(tiny_root, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(tiny_root, run, "iterations=2", "eval_every=2", "test_tasks=1000000")
    env = {k: v for k, v in os.environ.items() if k not in ("METARUN_DATA", "METARUN_DEBUG")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarun.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:  # training ends with iteration 2's validation; the test follows
        if line.startswith("iteration 2: validation accuracy"):
            break
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # the signal was ignored: the test of 10^6 tasks goes on
        proc.kill()
        pytest.fail("SIGTERM during the final test was ignored")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in out and "during the final test" in out
    assert f"Resume with: metarun train resume={run}" in out and "Traceback" not in err
    assert not (run / "results.json").exists() and last(run)["iteration"] == 2
    # the resume command tests again (training had ended) and writes the results
    again = run_metarun("train", f"resume={run}", "test_tasks=4", cwd=tmp_path, check=True)
    assert "test accuracy" in again.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["iterations_done"] == 2


def test_sigusr2_during_a_validation_stops_keeps_the_last_checkpoint_and_requeues(
    tiny_root, tmp_path, monkeypatch
):
    """A signal in a long validation: the run stops at once (nothing new written), the requeue
    handler a scheduler installed gets SIGUSR2, and the resumed run equals an uninterrupted one."""
    requeued = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))
    real = train_module.evaluate_tasks
    calls = []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second validation (iteration 4)
            os.kill(os.getpid(), signal.SIGUSR2)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_tasks", evaluate)
    run = tmp_path / "run"
    try:
        with pytest.raises(SystemExit) as stopped:
            train_in_process(tiny_root, run, "iterations=6", "eval_every=2")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert stopped.value.code == 128 + signal.SIGUSR2 and requeued == [signal.SIGUSR2]
    assert last(run)["iteration"] == 2  # the interrupted validation's checkpoints never written
    assert not (run / "checkpoints" / "top" / "iteration-4.pt").exists()
    monkeypatch.setattr(train_module, "evaluate_tasks", real)
    train_in_process(tiny_root, run, "iterations=6", "eval_every=2", f"resume={run}")
    whole = tmp_path / "whole"
    train_in_process(tiny_root, whole, "iterations=6", "eval_every=2")
    a, b = last(run), last(whole)
    assert a["iteration"] == b["iteration"] == 6 and a["top"] == b["top"]
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


# 3. What a run records (issue 22, case 14; the reproduction matrix) -------------------------------


def hparams_sessions(tensorboard: Path) -> list[tuple[str, dict, dict]]:
    """(run folder, its hparams, its hparam/* metrics) of each HParams record in tensorboard/."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions, metrics = [], {}
    for events in sorted(tensorboard.rglob("events.out.tfevents.*")):
        folder = str(events.parent.relative_to(tensorboard))
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag.startswith("hparam/"):
                    number = value.simple_value or torch.tensor(list(value.tensor.float_val))
                    metrics.setdefault(folder, {})[value.tag] = float(number)
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content
                )
                if data.HasField("session_start_info"):
                    hparams = {
                        k: v.number_value or v.string_value or v.bool_value
                        for k, v in data.session_start_info.hparams.items()
                    }
                    sessions.append((folder, hparams))
    return [(folder, hp, metrics.get(folder, {})) for folder, hp in sessions]


def test_a_resumed_run_has_one_hparams_record_with_its_final_settings(tiny_root, tmp_path):
    run = tmp_path / "run"
    train_in_process(tiny_root, run, "iterations=4", "eval_every=2")
    assert len(hparams_sessions(run / "tensorboard")) == 1
    results = train_in_process(tiny_root, run, "iterations=6", "eval_every=2", f"resume={run}")
    sessions = hparams_sessions(run / "tensorboard")
    assert len(sessions) == 1, sessions
    _, hparams, metrics = sessions[0]
    assert hparams["iterations"] == 6 and hparams["algorithm"] == "maml"
    assert metrics["hparam/test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)
    assert metrics["hparam/best_val_accuracy"] == pytest.approx(
        results["best_val_accuracy"], abs=1e-6
    )


def test_results_say_which_command_and_metarun_made_the_run(tiny_root, tmp_path):
    run = tmp_path / "run"
    first = settings(tiny_root, run, "iterations=2", "eval_every=2")
    train_in_process(tiny_root, run, "iterations=2", "eval_every=2")
    results = train_in_process(tiny_root, run, "iterations=3", f"resume={run}")
    assert results["metarun_version"] == metarun.__version__
    assert results["command"] == " ".join(["metarun", "train", *first])
    history = results["history"]
    assert history[0]["command"] == results["command"]
    assert (
        history[1]["command"].startswith("metarun train ")
        and f"resume={run}" in (history[1]["command"])
    )
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["command"] == results["command"]


def test_time_limit_ends_training_with_a_test_and_results(tiny_root, tmp_path):
    """time_limit (minutes) ends a run early as if its iterations were reached: last validation,
    test of the best checkpoint, results.json saying how far it got; the run continues with
    resume."""
    run = tmp_path / "run"
    proc = run_metarun(
        *tiny_args(tiny_root, run, "iterations=100000", "eval_every=100000", "time_limit=0.02"),
        cwd=tmp_path,
        check=True,
    )
    results = json.loads((run / "results.json").read_text())
    done = results["iterations_done"]
    assert (
        results["stopped_by"] == "time_limit"
        and 0 < done < 100000
        and "time_limit=0.02 min reached" in proc.stdout
    )
    assert (
        results["best_iteration"] == done
        and ckpt(run)["iteration"] == done
        and "test_accuracy" in results
    )
    more = run_metarun(
        "train",
        f"resume={run}",
        f"iterations={done + 2}",
        "time_limit=null",
        cwd=tmp_path,
        check=True,
    )
    assert f"at iteration {done}" in more.stdout
    final = json.loads((run / "results.json").read_text())
    assert final["iterations_done"] == done + 2 and final["stopped_by"] == "iterations"
    assert_clean_error(
        run_metarun(*tiny_args(tiny_root, tmp_path / "bad", "time_limit=-1"), cwd=tmp_path),
        "time_limit=-1 must be a positive number of minutes",
    )


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_root, tmp_path):
    run = tmp_path / "run"
    run_metarun(*tiny_args(tiny_root, run, "iterations=3"), cwd=tmp_path, check=True)
    good = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    # a huge inner step size overflows the adapted weights (update_lr cannot change on resume: the
    # run's saved config is edited instead)
    good["config"]["update_lr"] = 1e38
    atomic_torch_save(good, run / "checkpoints" / "last.pt")
    proc = run_metarun("train", f"resume={run}", "iterations=6", cwd=tmp_path)
    assert_clean_error(
        proc, "meta-loss became", "at iteration 4", "last good checkpoint", "Lower update_lr"
    )
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert kept["iteration"] == 3 and all(
        torch.equal(kept["params"][k], good["params"][k]) for k in good["params"]
    )
    # the error is in the run's log file too
    assert "meta-loss became" in (run / "metarun-train.log").read_text()


def test_cpu_allocator_setting_is_applied_once_and_only_on_request(monkeypatch):
    """tuned: glibc's mallopt is called (mmap and trim thresholds); system: nothing is changed."""
    import ctypes

    from metarun.runner import setup

    if not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("glibc only")
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    assert setup.apply_cpu_allocator("system") is False and calls == []
    assert setup.apply_cpu_allocator("tuned") is True
    assert calls == [(setup.M_MMAP_THRESHOLD, 2**30), (setup.M_TRIM_THRESHOLD, 2**30)]
