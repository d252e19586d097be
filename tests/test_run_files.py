"""A run dir's files (metarun/runner/files.py): named in one place, and the one atomic write
(metarun/io.py) that checkpoints and data caches share."""

import ast

from conftest import REPO

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
