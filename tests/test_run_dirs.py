"""Run dirs: a rejected run removes only what its own command created, never the user's files."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest
from helpers import assert_clean_error, run_metarun, strip, tiny_args

from metarun.errors import MetarunError
from metarun.runner import rundir


def user_folder(folder):
    """A folder of the user's, with files of the names a run writes."""
    (folder / "tensorboard" / "old_run").mkdir(parents=True)
    (folder / "tensorboard" / "old_run" / "events.out.tfevents.123").write_text("old events")
    (folder / "resolved.yaml").write_text("mine: 1\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "n.txt").write_text("notes")
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_rejected_run_in_an_existing_folder_leaves_the_users_files(tiny_root, tmp_path):
    proj = tmp_path / "proj"
    mine = user_folder(proj)
    proc = run_metarun(*tiny_args(tiny_root, proj, "way=200"), cwd=tmp_path)
    assert_clean_error(proc, "way=200 is larger than")
    left = {str(p.relative_to(proj)): p.read_bytes() for p in proj.rglob("*") if p.is_file()}
    assert left == mine  # nothing of the user's deleted, nothing of the rejected run left


def test_clean_up_removes_what_the_claim_found_absent_only(tmp_path):
    proj = tmp_path / "proj"
    mine = user_folder(proj)
    claim = rundir.claim(proj, auto=False)
    assert claim.path == proj and claim.created is None
    # what a run writes before it is rejected: its own files beside and inside the user's
    (proj / ".hydra").mkdir()
    (proj / ".hydra" / "config.yaml").write_text("way: 200\n")
    (proj / "tensorboard" / "events.out.tfevents.456").write_text("new events")
    (proj / "metarun-train.log").write_text("error\n")
    rundir.remove_unused(claim)
    left = {str(p.relative_to(proj)): p.read_bytes() for p in proj.rglob("*") if p.is_file()}
    assert left == mine and not (proj / ".hydra").exists()


def test_clean_up_of_a_created_dir_removes_it_and_its_new_parents(tmp_path):
    claim = rundir.claim(tmp_path / "outputs" / "train" / "t", auto=True)
    assert claim.created == tmp_path / "outputs"
    (claim.path / "resolved.yaml").write_text("x")
    rundir.remove_unused(claim)
    assert list(tmp_path.iterdir()) == []


def _claim(path, queue):
    queue.put(str(rundir.claim(path, auto=True)[0]))


def test_simultaneous_claims_of_one_dir_get_distinct_dirs(tmp_path):
    target = tmp_path / "outputs" / "train" / "2026-01-01_00-00-00"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(target, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    dirs = sorted(queue.get() for _ in procs)
    assert len(set(dirs)) == 4 and str(target) in dirs
    with pytest.raises(MetarunError, match="already belongs to another run"):
        rundir.claim(target, auto=False)
    # a dir in use is locked against a concurrent resume
    locked = rundir.claim(tmp_path / "busy", auto=False).path
    with pytest.raises(MetarunError, match="being run by another metarun process"):
        rundir.lock_existing(tmp_path / "busy")
    os.close(rundir._locks.pop(locked))


def test_runs_started_together_get_their_own_dirs(tiny_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("METARUN_DATA", "METARUN_DEBUG")}
    args = strip(tiny_args(tiny_root, tmp_path, "iterations=2", "eval_every=2"), "hydra.run.dir")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "metarun.cli", *args, f"seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2, 3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    runs = sorted((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 3
    assert sorted(json.loads((r / "results.json").read_text())["config"]["seed"] for r in runs) == [
        1,
        2,
        3,
    ]
    for r in runs:  # TensorBoard events of one process per dir (file names end in <host>.<pid>.<n>)
        assert len({p.name.split(".")[-2] for p in (r / "tensorboard").rglob("events.*")}) == 1


def test_rejected_run_in_the_default_dir_leaves_nothing(tiny_root, tmp_path):
    """way=40 is only found impossible once the data is loaded, after the dir was claimed: it is
    removed again, with the outputs/train/ folders its claim created, but not a folder another run
    made."""
    args = strip(tiny_args(tiny_root, tmp_path, "way=40"), "hydra.run.dir")
    assert_clean_error(run_metarun(*args, cwd=tmp_path), "way=40 is larger than the 33 classes")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "outputs" / "train" / "other").mkdir(parents=True)
    assert_clean_error(run_metarun(*args, cwd=tmp_path), "way=40")
    assert [p.name for p in (tmp_path / "outputs" / "train").iterdir()] == ["other"]
