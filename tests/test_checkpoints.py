"""Checkpoint files (metarun/runner/checkpoint.py, metarun/io.py): a failed write keeps the last
good checkpoint and says so in one line (issue 22, case 7); an unreadable checkpoint points at an
intact one of the same run, never at itself (case 9)."""

import errno
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_metarun
from test_robustness import assert_clean_error
from test_runner import train_in_process

from metarun.errors import MetarunError
from metarun.io import atomic_torch_save, write_failure
from metarun.runner import finish as finish_module
from metarun.runner.checkpoint import load_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1" / "run"


# 1. A full disk (case 7) --------------------------------------------------------------------------


def full_disk_after(monkeypatch, writes: int, chained: bool = True) -> list:
    """torch.save of a checkpoint succeeds `writes` times, then fails as torch does on a full disk:
    its zip writer's RuntimeError raised while handling the write's OSError (ENOSPC), or
    (chained=False) alone. Other files (the data cache) are written."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        if not str(obj.get("format", "")).startswith("metarun-checkpoint"):
            return real(obj, f, *args, **kwargs)
        calls.append(obj["iteration"])
        if len(calls) <= writes:
            return real(obj, f, *args, **kwargs)
        text = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
        if not chained:
            raise RuntimeError(text)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError(text)  # noqa: B904 (what torch does)

    monkeypatch.setattr(torch, "save", save)
    return calls


@pytest.mark.parametrize("chained", [True, False])
def test_full_disk_at_a_checkpoint_keeps_the_last_good_one(
    tiny_root, tmp_path, monkeypatch, chained
):
    run = tmp_path / "run"
    # iteration 2 writes top/iteration-2.pt, best.pt, last.pt; iteration 4 first top/iteration-4.pt
    full_disk_after(monkeypatch, 3, chained)
    with pytest.raises(MetarunError) as error:
        train_in_process(tiny_root, run, "iterations=4", "eval_every=2", "keep_best=2")
    message = str(error.value)
    assert "\n" not in message
    assert f"could not write the checkpoint {run / 'checkpoints' / 'top' / 'iteration-4.pt'}" in (
        message
    )
    assert "no space left on device" in message
    assert f"the last good checkpoint {run / 'checkpoints' / 'last.pt'} (iteration 2) is kept" in (
        message
    )
    assert f"resume with: metarun train resume={run}" in message
    monkeypatch.undo()
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert kept["iteration"] == 2
    assert not list(run.rglob("*.tmp"))  # no half-written file left behind


def test_full_disk_at_the_results_is_one_line(tiny_root, tmp_path, monkeypatch):
    def no_space(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finish_module, "atomic_write_text", no_space)
    run = tmp_path / "run"
    with pytest.raises(MetarunError, match="could not write .*results.json: no space left"):
        train_in_process(tiny_root, run, "iterations=2", "eval_every=2")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 2


def test_a_failed_torch_write_is_an_oserror_for_every_caller(tmp_path, monkeypatch):
    """The data caches catch OSError (a read-only dir): a full disk reaches them as one too."""
    full_disk_after(monkeypatch, 0)
    with pytest.raises(OSError) as error:
        atomic_torch_save({"format": "metarun-checkpoint-v2", "iteration": 1}, tmp_path / "x.pt")
    assert error.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())
    assert write_failure(ValueError("not a write")) is None


# 2. A truncated checkpoint (case 9) ---------------------------------------------------------------


@pytest.fixture
def damaged(tmp_path) -> Path:
    """A run dir (tests/fixtures' version-1 run) whose last.pt lost its second half."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    path = run / "checkpoints" / "last.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return run


def test_a_truncated_last_checkpoint_points_at_an_intact_one(damaged):
    broken = damaged / "checkpoints" / "last.pt"
    with pytest.raises(MetarunError) as error:
        load_checkpoint(broken, "resume")
    message = str(error.value)
    newest = damaged / "checkpoints" / "top" / "iteration-4.pt"  # the latest intact state
    assert "is not a readable checkpoint" in message
    assert f"intact checkpoint {newest} (iteration 4)" in message
    assert f"resume={newest}" in message and "e.g." not in message
    assert message.count(str(broken)) == 1  # named as the broken file, never advised
    with pytest.raises(MetarunError, match=f"checkpoint={damaged / 'checkpoints' / 'best.pt'}"):
        load_checkpoint(broken, "checkpoint")  # eval: the best state


def test_no_intact_checkpoint_left_is_said_so(damaged):
    for path in (damaged / "checkpoints").rglob("*.pt"):
        path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(MetarunError) as error:
        load_checkpoint(damaged, "checkpoint")
    assert "use another checkpoint written by metarun train" in str(error.value)
    assert "last.pt" not in str(error.value).split(";")[1]


def test_resume_auto_and_eval_of_a_truncated_checkpoint(damaged, tmp_path):
    proc = run_metarun("train", "resume=auto", f"hydra.run.dir={damaged}", cwd=tmp_path)
    assert_clean_error(proc, "last.pt is not a readable checkpoint", "top/iteration-4.pt")
    proc = run_metarun("eval", f"checkpoint={damaged / 'checkpoints' / 'last.pt'}", cwd=tmp_path)
    assert_clean_error(proc, "intact checkpoint", f"checkpoint={damaged}/checkpoints/best.pt")
