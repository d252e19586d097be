"""Sweeps (`metarun train -m`) as a user meets them, each in a real CLI subprocess: a finished
cell's record is never rewritten by a command that does not continue it, cells never share a dir, a
stopped sweep says how to finish it, and a search whose every trial fails ends with the failed-cell
summary."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_clean_error, run_metarun, tiny_args


def strip(args, *prefixes):
    return [a for a in args if not a.startswith(prefixes)]


def sweep_args(tiny_root, tmp_path, *extra):
    """The tiny training settings without way and the run dir: the sweep sets those."""
    args = strip(tiny_args(tiny_root, tmp_path), "hydra.run.dir", "way=")
    return [*args, "threads=1", "iterations=2", "eval_every=2", *extra]


def files(folder):
    """{relative path: bytes} of every file below folder (what a command must not change)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def optuna():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    return ["hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=0"]


@pytest.fixture(scope="module")
def finished(tiny_root, tmp_path_factory):
    """A finished two-cell sweep (way=2,3, resume=auto): (its command, its dir)."""
    tmp = tmp_path_factory.mktemp("finished")
    sweep = tmp / "sweep"
    command = [*sweep_args(tiny_root, tmp), "-m", "way=2,3", f"hydra.sweep.dir={sweep}"]
    run_metarun(*command, "resume=auto", cwd=tmp, check=True)
    for cell, way in (
        ("0", 2),
        ("1", 3),
    ):  # each cell wrote its own record once its dir was its own
        assert json.loads((sweep / cell / "results.json").read_text())["status"] == "completed"
        assert f"way={way}" in (sweep / cell / ".hydra" / "overrides.yaml").read_text()
    return command, sweep


# A finished cell's record is sacred --------------------------------------------------------------


def test_sweep_rerun_that_changes_a_fixed_setting_is_refused_before_any_cell(finished, tmp_path):
    command, sweep = finished
    before = files(sweep)
    proc = run_metarun(*command, "resume=auto", "meta_lr=0.002", "iterations=4", cwd=tmp_path)
    assert_clean_error(proc, "meta_lr=0.002 cannot change on resume", f"{sweep / '0'}")
    assert files(sweep) == before  # results.json, .hydra/, logs, checkpoints: untouched
    # the same sweep again without resume=auto: its dir is another command's
    assert_clean_error(run_metarun(*command, cwd=tmp_path), "already belongs to another run")
    assert files(sweep) == before


def test_failing_continuation_keeps_the_finished_results(finished, tmp_path):
    """eval_every may change on resume, so the cells start; their check then fails: the sweep says
    so, but their completed results.json and .hydra/ stay as they were."""
    command, sweep = finished
    kept = {k: v for k, v in files(sweep).items() if k.endswith("results.json") or "/.hydra/" in k}
    proc = run_metarun(*command, "resume=auto", "eval_every=0", cwd=tmp_path)
    line = [s for s in proc.stderr.splitlines() if s.startswith("metarun: error:")]
    assert proc.returncode == 2 and len(line) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "2 sweep cell(s) failed" in line[0] and "eval_every=0 must be a positive" in line[0]
    assert {k: v for k, v in files(sweep).items() if k in kept} == kept


def test_optuna_trial_never_rewrites_the_run_it_may_not_continue(tiny_root, tmp_path):
    """Any sweeper: its cells are known only as it runs, so each cell checks its own continuation
    and a refused one leaves the dir alone (and, every trial refused, the sweep ends with the
    summary)."""
    sweep = tmp_path / "sweep"
    search = [*optuna(), "way=choice(2)", "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sweep}"]
    command = [*sweep_args(tiny_root, tmp_path), "-m", *search, "resume=auto"]
    run_metarun(*command, cwd=tmp_path, check=True)
    before = files(sweep / "0")
    proc = run_metarun(*command, "update_lr=0.3", cwd=tmp_path)
    assert_clean_error(proc, "1 sweep cell(s) failed", "update_lr=0.3 cannot change on resume")
    assert files(sweep / "0") == before


# Two cells mapped to one dir ----------------------------------------------------------------------


def test_cells_that_resolve_to_one_dir_are_refused_before_the_first(tiny_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_metarun(
        *sweep_args(tiny_root, tmp_path, "way=3"),
        "-m",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=way${way}",
        cwd=tmp_path,
    )
    assert_clean_error(proc, f"{sweep / 'way3'}", "seed=0", "seed=1", "hydra.sweep.subdir")
    assert not sweep.exists()


def test_any_sweeper_never_writes_into_a_dir_its_cell_did_not_claim(tiny_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_metarun(
        *sweep_args(tiny_root, tmp_path, "way=3"),
        "-m",
        *optuna(),
        "seed=choice(0,1)",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=same",
        cwd=tmp_path,
    )
    assert_clean_error(proc, "1 sweep cell(s) failed", "already belongs to another run")
    record = json.loads((sweep / "same" / "results.json").read_text())
    assert record["status"] == "completed"
    seed = record["config"]["seed"]
    overrides = (sweep / "same" / ".hydra" / "overrides.yaml").read_text()
    assert f"seed={seed}" in overrides and overrides.count("seed=") == 1
    log = (sweep / "same" / "metarun-train.log").read_text()
    assert "already belongs" not in log


# A stopped sweep, a search with no finished trial -------------------------------------------------


def test_sigterm_in_a_sweep_says_how_to_finish_the_sweep(tiny_root, tmp_path):
    sweep = tmp_path / "sweep"
    args = sweep_args(tiny_root, tmp_path, "iterations=100000", "eval_every=100000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarun.cli", *args, "-m", "way=2,3", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k not in ("METARUN_DATA", "METARUN_DEBUG")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not list((sweep / "0" / "tensorboard").glob("events.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    printed = [s for s in out.splitlines() if "finish it with: " in s]
    assert len(printed) == 1, out
    finish = shlex.split(printed[0].split("finish it with: ")[1])
    assert finish[:3] == ["metarun", "train", "-m"] and "way=2,3" in finish
    assert f"hydra.sweep.dir={sweep}" in finish and "resume=auto" in finish
    assert not (sweep / "1").exists()
    # the command as printed finishes the sweep (with an end this test can reach)
    stopped = torch.load(sweep / "0" / "checkpoints" / "last.pt", weights_only=True)["iteration"]
    run_metarun(*finish[1:], f"iterations={stopped + 2}", cwd=tmp_path, check=True)
    for cell, way in (("0", 2), ("1", 3)):
        record = json.loads((sweep / cell / "results.json").read_text())
        assert record["status"] == "completed" and record["config"]["way"] == way


def test_optuna_search_where_every_trial_fails_ends_with_the_summary(tiny_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_metarun(
        *sweep_args(tiny_root, tmp_path),
        "-m",
        *optuna(),
        "way=choice(5000,6000)",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert_clean_error(proc, "2 sweep cell(s) failed", "larger than the")
    assert len(list(sweep.glob("*/results.json"))) == 2


def test_sweep_records_failed_cells_and_runs_the_others(tiny_root, tmp_path):
    args = strip(
        tiny_args(tiny_root, tmp_path, "iterations=2", "eval_every=2"), "hydra.run.dir", "way="
    )
    sweep = tmp_path / "sweep"
    proc = run_metarun(*args, "-m", "way=5000,five,3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("metarun: error:")]
    assert (
        len(line) == 1
        and "2 sweep cell(s) failed" in line[0]
        and "way=5000" in line[0]
        and "way=five" in line[0]
    )
    cells = {c: json.loads((sweep / c / "results.json").read_text()) for c in ("0", "1", "2")}
    assert cells["0"]["status"] == "failed" and "larger than the 33 classes" in cells["0"]["reason"]
    assert (
        cells["1"]["status"] == "failed"
        and "way=five must be a positive integer" in cells["1"]["reason"]
    )
    assert cells["2"]["status"] == "completed" and cells["2"]["config"]["way"] == 3
    assert "larger than the 33 classes" in (sweep / "0" / "metarun-train.log").read_text()
    # the report of that sweep: the finished cell filled, the failed ones marked with their reasons
    # (#16)
    report = run_metarun("report", str(sweep), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    table = report.stdout
    assert "| 3 |" in table and table.count("failed") >= 2 and "larger than the 33 classes" in table
    assert (sweep / "report.md").read_text() == table and (sweep / "report.csv").is_file()


def test_sweep_with_a_mistyped_setting_fails_before_any_cell(tiny_root, tmp_path):
    args = strip(tiny_args(tiny_root, tmp_path, "iterations=2"), "hydra.run.dir")
    proc = run_metarun(
        *args, "-m", "way=2,3", "wya=4", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path
    )
    assert_clean_error(proc, "unknown setting 'wya'")
    assert not (tmp_path / "sweep").exists()
