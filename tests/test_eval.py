"""`metarun eval` and the checkpoint files it reads: what it refuses, in one line, before it creates
its output dir."""

import json
import pickle
import shutil
import zipfile

import pytest
import torch
from helpers import REPO, assert_clean_error, ckpt, run_metarun, tiny_args
from omegaconf import OmegaConf

import metarun
from metarun.errors import MetarunError
from metarun.runner.checkpoint import load_checkpoint
from metarun.runner.evaluate_checkpoint import check_curve_reach

# ---- a file that is not a checkpoint ------------------------------------------------------------


def test_eval_of_the_readme_says_it_is_not_a_checkpoint(tmp_path):
    """`metarun eval checkpoint=README.md` used to say the file "carries pickled objects", followed
    by PyTorch's weights_only text."""
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    proc = run_metarun("eval", "checkpoint=README.md", cwd=tmp_path)
    assert_clean_error(
        proc,
        "checkpoint=README.md is not a checkpoint (a text file, not a zip/torch file)",
        "point checkpoint at a run dir or its checkpoints/best.pt",
    )
    assert "pickled" not in proc.stderr and "weights_only" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


def write_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name in members:
            zf.writestr(name, b"x")


@pytest.mark.parametrize(
    "setting, make, fragment",
    [
        ("resume", lambda p: p.write_text("way: 5\n"), "(a text file, not a zip/torch file)"),
        ("checkpoint", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00"), "(not a zip/torch"),
        ("checkpoint", lambda p: write_zip(p, ["images/a.png"]), "(a zip archive without the"),
    ],
)
def test_files_torch_did_not_write_are_named_as_such(tmp_path, setting, make, fragment):
    path = tmp_path / "file.pt"
    make(path)
    with pytest.raises(MetarunError) as info:
        load_checkpoint(path, setting)
    message = str(info.value)
    assert message.startswith(f"{setting}={path} is not a checkpoint ") and fragment in message
    name = "last.pt" if setting == "resume" else "best.pt"
    assert f"point {setting} at a run dir or its checkpoints/{name}" in message


def test_damaged_checkpoints_keep_their_own_messages(tmp_path):
    """A truncated or empty checkpoint is unreadable (not "not a checkpoint"); a pickle of objects
    is refused without running them; a plain torch file is not a metarun one."""
    real = tmp_path / "real.pt"
    torch.save({"format": "metarun-checkpoint-v1", "params": {"w": torch.zeros(64)}}, real)
    (tmp_path / "cut.pt").write_bytes(real.read_bytes()[:200])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "objects.pt").write_bytes(pickle.dumps(MetarunError("x"), protocol=2))
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    expected = {
        "cut.pt": "is not a readable checkpoint",
        "empty.pt": "is not a readable checkpoint",
        "objects.pt": "was refused: it carries pickled objects",
        "plain.pt": "is not a metarun checkpoint",
    }
    for name, fragment in expected.items():
        with pytest.raises(MetarunError, match=fragment):
            load_checkpoint(tmp_path / name)


# ---- steps= beyond a checkpoint's per-step weights ----------------------------------------------


def test_eval_steps_past_mamlpps_per_step_weights_is_one_line(tiny_root, tmp_path):
    """A MAML++ run with per-step weights for 1 inner step: `steps=0,1,2,3` used to end in an
    IndexError traceback and an empty eval dir; now one line, as update_step_test=3 gets; no dir."""
    run = tmp_path / "run"
    mamlpp = ["algorithm=mamlpp", "update_step=1", "update_step_test=1", "iterations=2"]
    mamlpp += ["eval_every=2", "algorithm.iterations_per_epoch=2", "algorithm.msl_epochs=1"]
    run_metarun(*tiny_args(tiny_root, run, *mamlpp, "threads=1"), cwd=tmp_path, check=True)
    out = tmp_path / "eval"
    proc = run_metarun(
        "eval", f"checkpoint={run}", "steps=0,1,2,3", f"hydra.run.dir={out}", cwd=tmp_path
    )
    assert_clean_error(
        proc,
        "steps=0,1,2,3 goes to 3 inner steps",
        "per-step weights (algorithm.bnwb / lslr) for its update_step=1 training steps only",
        "e.g. steps=0,1.",
    )
    assert not out.exists()
    proc = run_metarun(
        "eval", f"checkpoint={run}", "update_step_test=3", f"hydra.run.dir={out}", cwd=tmp_path
    )
    assert_clean_error(proc, "update_step_test=3 > update_step=1")
    assert not out.exists()
    proc = run_metarun(
        "eval", f"checkpoint={run}", "steps=0,1", "tasks=4", f"hydra.run.dir={out}", cwd=tmp_path
    )
    assert proc.returncode == 0 and (out / "eval.json").is_file(), proc.stderr
    record = json.loads((out / "eval.json").read_text())  # how to make it again, and with what
    # steps=0,1 reaches Hydra as a list (cli.py), which is how the record writes it
    assert record["command"] == f"metarun eval checkpoint={run} 'steps=[0,1]' tasks=4"
    assert record["metarun_version"] == metarun.__version__


@pytest.mark.parametrize(
    "algorithm, refused",
    [
        ({"name": "mamlpp", "bnwb": True, "lslr": True}, True),
        ({"name": "mamlpp", "bnwb": False, "lslr": True}, True),
        ({"name": "mamlpp", "bnwb": True, "lslr": False}, True),
        ({"name": "mamlpp", "bnwb": False, "lslr": False}, False),  # nothing per step
        ({"name": "maml"}, False),
        ({"name": "metasgd"}, False),  # one learned rate per weight, for any number of steps
    ],
)
def test_curve_reach_follows_the_per_step_weights(algorithm, refused):
    config = {"update_step": 2, "algorithm": algorithm}
    check_curve_reach([0, 1, 2], config)
    check_curve_reach(None, config)
    if refused:
        with pytest.raises(MetarunError, match=r"steps=0,3,10 goes to 10 .* e\.g\. steps=0\."):
            check_curve_reach([0, 3, 10], config)
    else:
        check_curve_reach([0, 3, 10], config)


def test_scores_equal_for_any_chunk_size_and_impl(run, tiny_root):
    from metarun.runner.evaluate import evaluate_tasks
    from metarun.runner.setup import build_algorithm, load_splits

    run, _, _ = run
    blob = load_checkpoint(run / "checkpoints" / "last.pt")
    cfg = OmegaConf.create(blob["config"])
    splits = load_splits(cfg, torch.device("cpu"))["splits"]
    scores = set()
    for impl in ("loop", "batched", "parallel"):
        cfg.algorithm.impl = impl
        _, maml = build_algorithm(cfg, torch.device("cpu"))
        for chunk in (1, 4, 7, 12):
            cfg.eval_chunk = chunk
            scores.add(evaluate_tasks(maml, blob["params"], splits["test"], "test", cfg, "cpu", 12))
    assert len(scores) == 1, scores


def test_eval_scores_equal_for_any_eval_chunk(run, tiny_root, tmp_path):
    run, _, _ = run
    accuracies = []
    for chunk in (1, 7):
        out = tmp_path / f"eval{chunk}"
        run_metarun(
            "eval",
            f"checkpoint={run}",
            "tasks=10",
            f"eval_chunk={chunk}",
            f"hydra.run.dir={out}",
            cwd=tmp_path,
            check=True,
        )
        accuracies.append(json.loads((out / "eval.json").read_text())["accuracy"])
    assert accuracies[0] == accuracies[1]


def test_eval_says_what_it_scored(run, tmp_path):
    run, _, _ = run
    out = run_metarun(
        "eval",
        f"checkpoint={run}",
        "tasks=3",
        f"hydra.run.dir={tmp_path / 'e'}",
        cwd=tmp_path,
        check=True,
    ).stdout
    best = ckpt(run, "best.pt")["iteration"]
    assert (
        f"{run / 'checkpoints' / 'best.pt'} (iteration {best})" in out
        and f"{tmp_path / 'e' / 'eval.json'}" in out
    )
    # a run stopped before its first validation has no best.pt: eval says it scores last.pt
    early = tmp_path / "early"
    (early / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.pt", early / "checkpoints" / "last.pt")
    proc = run_metarun(
        "eval",
        f"checkpoint={early}",
        "tasks=3",
        f"hydra.run.dir={tmp_path / 'e2'}",
        cwd=tmp_path,
        check=True,
    )
    assert (
        "has no checkpoints/best.pt" in proc.stderr
        and "scoring last.pt (iteration 6)" in proc.stderr
    )
