"""A run dir's files (metarun/runner/files.py): named in one place, and the one atomic write
(metarun/io.py) that checkpoints and data caches share."""

import ast
import os
import subprocess
import sys
import time

import torch
from helpers import REPO, ckpt
from omegaconf import OmegaConf

from metarun.data.omniglot import atomic_torch_save
from metarun.runner.files import RunFiles

PACKAGE = REPO / "metarun"
NAMES = (
    "last.pt",
    "best.pt",
    "results.json",
    "resolved.yaml",
    "eval.json",
    ".metarun-run",
    "checkpoints",
    "tensorboard",
    ".hydra",
    "iteration-",
    "metarun-*.log",
)


def string_constants(tree: ast.AST):
    """(line, text) of every string constant that is not a docstring."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                yield node.lineno, node.value


def names_a_file(text: str) -> bool:
    """A string that builds a run dir path: a name itself, or a bare path fragment ending in one
    ("checkpoints/last.pt", "/best.pt"); prose that mentions a file (messages, help) is not."""
    if text in NAMES:
        return True
    return " " not in text and any(text.endswith("/" + name) for name in NAMES)


def test_no_module_but_files_spells_a_run_dir_file_name():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "runner" / "files.py":
            continue
        for line, text in string_constants(ast.parse(path.read_text())):
            if names_a_file(text):
                found.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert not found, "\n".join(found)


def test_eval_does_not_import_the_training_loop():
    tree = ast.parse((PACKAGE / "runner" / "evaluate_checkpoint.py").read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "metarun.runner.train" not in imported


def test_checkpoints_and_data_caches_share_one_atomic_write():
    import metarun.data.imagecache
    import metarun.data.omniglot
    import metarun.io
    import metarun.runner.checkpoint

    save = metarun.io.atomic_torch_save
    # both data caches write through omniglot.save_cache (its full-disk fallback), which saves here
    assert metarun.data.imagecache.save_cache is metarun.data.omniglot.save_cache
    assert metarun.data.omniglot.atomic_torch_save is save  # scripts and tests import it there
    assert metarun.runner.checkpoint.atomic_torch_save is save


def test_run_files_layout(tmp_path):
    files = RunFiles(tmp_path / "run")
    assert files.last == tmp_path / "run" / "checkpoints" / "last.pt"
    assert files.top(12) == tmp_path / "run" / "checkpoints" / "top" / "iteration-12.pt"
    assert files.hparams.parent == files.tensorboard
    assert RunFiles.of_checkpoint(files.top(12)) == files == RunFiles.of_checkpoint(files.best)
    for path in (files.last, files.best, files.top(4), files.top(12)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (files.top_dir / "notes.pt").write_bytes(b"")  # not a checkpoint of the run's naming
    assert files.checkpoint_files() == [files.last, files.best, files.top(12), files.top(4)]
    assert files.has_checkpoints()


def test_log_file_holds_the_runs_messages(run):
    run, before, _ = run
    text = (run / "metarun-train.log").read_text()
    assert "\r" not in text and "meta-train" not in text  # tqdm stays on the console
    for fragment in (
        "3-way 1-shot 2-query on cpu",
        "iteration 3: validation accuracy",
        "iteration 6: validation accuracy",
        "test accuracy",
        "resumed from",
        "run dir",
    ):
        assert fragment in text, fragment
    assert (
        "into the cache" in before["stdout"] and "MiB" in before["stdout"]
    )  # 9. where a cache goes, its size


def test_resolved_settings_are_recorded(run):
    run, _, _ = run
    resolved = OmegaConf.load(run / "resolved.yaml")
    assert resolved.device == "cpu" and resolved.algorithm.impl in ("batched", "loop", "parallel")
    assert "from the archives in" in resolved.data_source and os.path.isabs(resolved.dataset.root)
    assert "${" not in (run / "resolved.yaml").read_text()
    assert ckpt(run)["resolved"]["algorithm"]["impl"] == resolved.algorithm.impl


WRITER = """
import sys, torch
from metarun.data.omniglot import atomic_torch_save
path = sys.argv[1]
i = 0
while True:
    i += 1
    atomic_torch_save({"i": i, "w": torch.full((3_000_000,), float(i))},\
 __import__("pathlib").Path(path))
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


def test_atomic_save_gives_the_permissions_of_a_plain_write(tmp_path):
    """Caches and checkpoints in shared folders stay readable as the umask allows (mkstemp alone
    gives 0600)."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "saved.pt")
    assert (tmp_path / "saved.pt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
