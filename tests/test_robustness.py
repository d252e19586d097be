"""Bad input, interruption, numerical faults and tampered files: a clear message, no lost work."""

import os
import pickle
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, make_omniglot, run_metarun, tiny_args

from metarun.data.omniglot import atomic_torch_save


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    line = [l for l in proc.stderr.splitlines() if l.startswith("metarun: error:")]
    assert len(line) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in line[0], (fragment, line[0])


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    run_metarun(*tiny_args(tiny_root, run), cwd=run.parent, check=True)
    return run


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("wya=5", ["unknown setting 'wya'", "--help"]),
        ("way=40", ["way=40 is larger than the 33 classes of the train split"]),
        ("shot=15", ["shot+query=15+6=21 is more than the 20 images per class"]),
        ("update_lr=0", ["update_lr=0 must be a positive number"]),
        ("way=five", ["way=five must be a positive integer"]),
        ("eval_chunk=0", ["eval_chunk=0 must be a positive integer"]),
        ("meta_lr=-0.001", ["meta_lr=-0.001 must be a positive number"]),
        ("update_step=0", ["update_step=0 must be a positive integer"]),
        ("meta_batch=0", ["meta_batch=0 must be a positive integer"]),
        ("iterations=-5", ["iterations=-5 must be a positive integer"]),
        ("dataset.split=alphabetical", ["dataset.split='alphabetical'", "maml", "lake"]),
        ("device=tpu", ["device=tpu"]),
        ("cpu_allocator=jemalloc", ["cpu_allocator=jemalloc is not a setting", "tuned", "system"]),
        (
            "hydra.run.dir=/proc/metarun-cannot-write",
            ["/proc/metarun-cannot-write", "hydra.run.dir"],
        ),
        ("resume=/nonexistent/last.pt", ["resume=/nonexistent/last.pt does not exist"]),
    ],
)
def test_bad_setting_fails_early_with_one_line(tiny_root, tmp_path, override, fragments):
    args = tiny_args(tiny_root, tmp_path / "run", "query=6")
    if override.startswith("hydra.run.dir"):
        args = [a for a in args if not a.startswith("hydra.run.dir")]
    proc = run_metarun(*args, override, cwd=tmp_path)
    assert_clean_error(proc, *fragments)
    # a rejected command leaves nothing behind: no run dir, no outputs/ (#11)
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_root, tmp_path):
    assert_clean_error(
        run_metarun(*tiny_args(tiny_root, tmp_path / "run"), "device=cuda", cwd=tmp_path),
        "device=cuda",
        "no usable CUDA",
        "device=cpu",
    )


def test_missing_and_damaged_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_metarun(
        *tiny_args(empty, tmp_path / "r1", "dataset.source=archives", "dataset.download=false"),
        cwd=tmp_path,
    )
    assert_clean_error(proc, str(empty), "images_background.zip", "dataset.root")
    bad = make_omniglot(
        tmp_path / "bad", layout={"images_background": 1, "images_evaluation": 1}, characters=2
    )
    (bad / "images_evaluation.zip").write_bytes(b"PK\x03\x04 this is no zip")
    assert_clean_error(
        run_metarun(*tiny_args(bad, tmp_path / "r2"), cwd=tmp_path),
        "images_evaluation.zip",
        "not a readable zip",
    )
    data = (bad / "images_background.zip").read_bytes()
    (bad / "images_background.zip").write_bytes(data[: len(data) * 2 // 3])
    assert_clean_error(
        run_metarun(*tiny_args(bad, tmp_path / "r3"), cwd=tmp_path), "images_background.zip"
    )


def test_corrupt_cache_is_rebuilt(tiny_root, tmp_path):
    root = make_omniglot(tmp_path / "data")
    run_metarun(*tiny_args(root, tmp_path / "r1", "iterations=1"), cwd=tmp_path, check=True)
    cache = root / "cache" / "omniglot_28.pt"
    cache.write_bytes(cache.read_bytes()[:1000])
    proc = run_metarun(*tiny_args(root, tmp_path / "r2", "iterations=1"), cwd=tmp_path, check=True)
    assert "stale or corrupt; rebuilding" in proc.stderr
    torch.load(cache, weights_only=True)


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


WRITER = """
import sys, torch
from metarun.data.omniglot import atomic_torch_save
path = sys.argv[1]
i = 0
while True:
    i += 1
    atomic_torch_save({"i": i, "w": torch.full((3_000_000,), float(i))}, __import__("pathlib").Path(path))
    print(i, flush=True)
"""


def test_kill_during_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"i": 0, "w": torch.zeros(3_000_000)}, path)
    for delay in (0.3, 0.55, 0.8, 1.1):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE
        )
        proc.stdout.readline()  # at least one write finished; the next is under way
        time.sleep(delay)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
        blob = torch.load(path, weights_only=True)
        assert torch.equal(blob["w"], torch.full((3_000_000,), float(blob["i"])))


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


def test_atomic_save_gives_the_permissions_of_a_plain_write(tmp_path):
    """Caches and checkpoints in shared folders stay readable as the umask allows (mkstemp alone
    gives 0600)."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "saved.pt")
    assert (tmp_path / "saved.pt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_console_logging_keeps_its_split_and_levels_while_the_bar_runs(capsys):
    """During training (a tqdm bar) INFO goes to stdout, warnings to stderr, and a quiet handler
    (torchrun's other ranks: warnings only) stays quiet; tqdm's logging_redirect_tqdm merged them
    into one handler."""
    import logging

    from metarun.runner.logs import BelowWarning, console_through_tqdm

    root, saved = logging.getLogger(), (logging.getLogger().handlers[:], logging.getLogger().level)
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(BelowWarning())
    err.setLevel(logging.WARNING)
    root.handlers, root.level = [out, err], logging.INFO
    try:
        with console_through_tqdm():
            logging.getLogger("metarun").info("an info line")
            logging.getLogger("metarun").warning("a warning line")
        logging.getLogger("metarun").info("after the bar")
    finally:
        root.handlers, root.level = saved
    captured = capsys.readouterr()
    assert captured.out == "an info line\nafter the bar\n" and captured.err == "a warning line\n"
    assert out.emit.__func__ is logging.StreamHandler.emit  # restored


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
