"""Checkpoints: plain tensors, dicts, lists and strings only, written atomically, read with weights_only=True."""

from __future__ import annotations

import codecs
import pickle
import zipfile
from pathlib import Path

import torch

from metarun.data.omniglot import atomic_torch_save
from metarun.errors import MetarunError

FORMAT = "metarun-checkpoint-v1"


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_torch_save({"format": FORMAT, **state}, Path(path))


def resolve_checkpoint_path(path: str | Path, setting: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        # resume continues the latest state; eval scores the best one
        for name in ("last.pt", "best.pt") if setting == "resume" else ("best.pt", "last.pt"):
            if (p / "checkpoints" / name).is_file():
                return p / "checkpoints" / name
        raise MetarunError(
            f"{setting}={path} is a folder without checkpoints/last.pt or best.pt: point {setting} at a "
            "run dir or a .pt file written by metarun train."
        )
    if not p.is_file():
        raise MetarunError(
            f"{setting}={path} does not exist: point {setting} at a checkpoint written by metarun "
            "train (<run dir>/checkpoints/last.pt or best.pt)."
        )
    return p


def _another(path: Path) -> str:
    """Where to look instead of a bad checkpoint file of a run."""
    if path.name == "best.pt":
        return "another of the run's checkpoints (checkpoints/top/*.pt or last.pt)"
    return "an earlier checkpoint of the run (checkpoints/best.pt or checkpoints/top/*.pt)"


def _not_a_torch_file(p: Path) -> str | None:
    """What a file is when torch.save cannot have written it, else None. torch.save writes a zip
    archive holding data.pkl (legacy files: a pickle, first byte 0x80); a file that is neither (a
    README, an image) would reach the unpickler and get its "pickled objects"/weights_only text. An
    empty or truncated zip is left to torch.load, whose error says it is unreadable."""
    with open(p, "rb") as fh:
        head = fh.read(512)
    if not head or head.startswith(b"\x80"):
        return None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names):
            return None
        return "a zip archive without the data.pkl of torch.save"
    try:  # final=False: the 512 bytes may end inside a character
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        text = b"\x00" not in head
    except UnicodeDecodeError:
        text = False
    return "a text file, not a zip/torch file" if text else "not a zip/torch file"


def load_checkpoint(path: str | Path, setting: str = "checkpoint") -> dict:
    """Loads and checks a metarun checkpoint; every failure is a MetarunError naming the file and setting."""
    p = resolve_checkpoint_path(path, setting)
    what = _not_a_torch_file(p)
    if what:
        name = "last.pt" if setting == "resume" else "best.pt"
        raise MetarunError(
            f"{setting}={p} is not a checkpoint ({what}): point {setting} at a run dir or its "
            f"checkpoints/{name}, written by metarun train."
        )
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any pickled object other than tensors and plain containers; nothing ran.
        raise MetarunError(
            f"{setting}={p} was refused: it carries pickled objects that are not plain tensors "
            f"or containers, so it is not a metarun checkpoint and was not loaded ({str(exc).splitlines()[0]}). "
            "Only load checkpoints you trust, written by metarun train."
        )
    except Exception as exc:
        raise MetarunError(
            f"{setting}={p} is not a readable checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'truncated or corrupt'}). Use another "
            "checkpoint, e.g. <run dir>/checkpoints/last.pt."
        )
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise MetarunError(
            f"{setting}={p} is not a metarun checkpoint (no '{FORMAT}' marker): point {setting} at "
            "a file written by metarun train."
        )
    for key in ("params", "config", "iteration"):
        if key not in blob:
            raise MetarunError(f"{setting}={p} is incomplete (no '{key}'): use another checkpoint.")
    bad = nonfinite_tensor(blob["params"], "params") or nonfinite_tensor(
        blob.get("optimizer", {}), "optimizer"
    )
    if bad:
        raise MetarunError(
            f"{setting}={p}: {bad} holds NaN or inf values, so it would score or train as garbage "
            f"(a diverged run or a damaged file): use {_another(p)}."
        )
    return blob


def nonfinite_tensor(tree, name: str = "params") -> str | None:
    """The first floating tensor in a nested dict/list holding NaN or inf, described as e.g.
    "tensor 'params.conv0.weight' (1 of 72 values)", or None when all are finite. Any names, any nesting."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            finite = torch.isfinite(tree)
            if not bool(finite.all()):
                return f"tensor '{name}' ({int((~finite).sum())} of {tree.numel()} values)"
        return None
    items = (
        tree.items()
        if isinstance(tree, dict)
        else enumerate(tree)
        if isinstance(tree, (list, tuple))
        else ()
    )
    for key, value in items:
        found = nonfinite_tensor(value, f"{name}.{key}")
        if found:
            return found
    return None


def checkpoint_params(blob: dict, expected: dict, path, setting: str) -> dict:
    """The checkpoint's weights, refused unless they have exactly the names and shapes of `expected`."""
    saved = blob["params"]
    if (
        not isinstance(saved, dict)
        or set(saved) != set(expected)
        or any(
            not isinstance(saved[k], torch.Tensor) or saved[k].shape != expected[k].shape
            for k in expected
        )
    ):
        raise MetarunError(
            f"{setting}={path}: its weights do not match the learner of its own config (a damaged "
            "or hand-edited file): use another checkpoint."
        )
    return saved
