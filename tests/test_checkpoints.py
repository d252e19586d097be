"""Checkpoint files (metarun/runner/checkpoint.py, metarun/io.py): a failed write keeps the last
good checkpoint and says so in one line (issue 22, case 7); an unreadable checkpoint points at an
intact one of the same run, never at itself (case 9)."""

import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_clean_error,
    ckpt,
    compose_train,
    run_metarun,
    strip,
    tiny_args,
    train_in_process,
)

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


def test_nonfinite_checkpoint_is_refused_by_eval_and_resume(run, tmp_path):
    run, _, _ = run
    blob = ckpt(run, "best.pt")
    blob["params"]["conv0.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "bad.pt"
    torch.save(blob, bad)
    proc = run_metarun("eval", f"checkpoint={bad}", cwd=tmp_path)
    assert_clean_error(proc, "bad.pt", "tensor 'params.conv0.weight' (1 of", "NaN or inf")
    assert "accuracy" not in proc.stdout
    proc = run_metarun("train", f"resume={bad}", "iterations=8", cwd=tmp_path)
    assert_clean_error(proc, "tensor 'params.conv0.weight'")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("setting", ["checkpoint", "resume"])
def test_every_loaded_tensor_is_checked(run, tmp_path, setting):
    """The general form: any tensor of params (whatever its name) or of the Adam state, NaN or inf,
    and the check is in load_checkpoint, which eval, resume and the end-of-training test all use."""
    run, _, _ = run
    for tree, name, value in (
        ("params", "fc.bias", float("inf")),
        ("params", "meta.lr.conv0", float("nan")),
        ("optimizer", "exp_avg_sq", float("-inf")),
    ):
        blob = ckpt(run)
        if tree == "params":
            blob["params"][name] = torch.full((3,), value)
            where = f"params.{name}"
        else:
            blob["optimizer"]["state"][2][name].view(-1)[0] = value
            where = f"optimizer.state.2.{name}"
        torch.save(blob, tmp_path / "x.pt")
        pattern = rf"{setting}=.*x\.pt: tensor '{where}' \(\d+ of \d+ values\) holds NaN or inf"
        with pytest.raises(MetarunError, match=pattern):
            load_checkpoint(tmp_path / "x.pt", setting)


def test_nonfinite_weights_never_reach_a_checkpoint(tiny_root, tmp_path, monkeypatch):
    """Weights that turn NaN while the loss is still finite (between checks) stop the run before any
    checkpoint is written, on every device (the check runs right before each save)."""
    from metarun.runner import train as train_module

    real = train_module.meta_train_step

    def poisoned(maml, params, optimizer, episodes):
        result = real(maml, params, optimizer, episodes)
        if optimizer.state[next(iter(params.values()))]["step"] >= 2:
            with torch.no_grad():
                params["fc.bias"][0] = float("nan")
        return result

    monkeypatch.setattr(train_module, "meta_train_step", poisoned)
    cfg = compose_train(
        *strip(tiny_args(tiny_root, tmp_path / "x"), "train", "hydra."),
        "iterations=4",
        "eval_every=2",
    )
    with pytest.raises(
        MetarunError, match=r"weights became non-finite \(tensor 'params.fc.bias'.*at iteration 2"
    ):
        train_module.train(cfg, tmp_path)
    assert (
        not (tmp_path / "checkpoints" / "last.pt").exists()
        and not (tmp_path / "checkpoints" / "best.pt").exists()
    )


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    run_metarun(*tiny_args(tiny_root, run), cwd=run.parent, check=True)
    return run


def test_bad_checkpoints(trained, tiny_root, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    assert_clean_error(
        run_metarun("eval", f"checkpoint={text}", cwd=tmp_path),
        "notes.pt",
        "is not a checkpoint (a text file, not a zip/torch file)",
    )
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    assert_clean_error(
        run_metarun("eval", f"checkpoint={plain}", cwd=tmp_path), "not a metarun checkpoint"
    )
    # a damaged checkpoint: its weights do not fit its own config
    damaged = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    damaged["params"]["fc.weight"] = damaged["params"]["fc.weight"][:2]
    torch.save(damaged, tmp_path / "damaged.pt")
    assert_clean_error(
        run_metarun("eval", f"checkpoint={tmp_path / 'damaged.pt'}", cwd=tmp_path),
        "damaged.pt",
        "do not match",
    )
    assert not (tmp_path / "outputs").exists()  # a rejected eval creates no output dir
    # a resumed run keeps the learner it was trained with
    proc = run_metarun(
        *tiny_args(tiny_root, tmp_path / "other", "way=4", f"resume={trained}"), cwd=tmp_path
    )
    assert_clean_error(proc, "way=4 cannot change on resume", "(way=3)")
    assert not (tmp_path / "other").exists()
    # and a finished run's dir is never overwritten by a new run
    proc = run_metarun(*tiny_args(tiny_root, trained), cwd=tmp_path)
    assert_clean_error(proc, "already belongs to another run", "resume=")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_never_runs(trained, tmp_path):
    marker = tmp_path / "payload-ran"
    blob = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    blob["extra"] = Payload(marker)
    evil = tmp_path / "evil.pt"
    torch.save(blob, evil)
    assert_clean_error(
        run_metarun("eval", f"checkpoint={evil}", cwd=tmp_path), "evil.pt", "refused"
    )
    assert_clean_error(
        run_metarun("train", f"resume={evil}", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path),
        "refused",
    )
    with open(evil, "wb") as fh:  # a bare pickle, not even a torch zip
        pickle.dump(Payload(marker), fh)
    assert_clean_error(run_metarun("eval", f"checkpoint={evil}", cwd=tmp_path), "evil.pt")
    assert not marker.exists()
