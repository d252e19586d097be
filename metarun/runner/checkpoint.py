"""Checkpoint files: a TrainState's dict (runner/state.py) written atomically, read back with
torch.load(weights_only=True) and checked; every failure is one MetarunError naming the file."""

from __future__ import annotations

import codecs
import pickle
import zipfile
from pathlib import Path

import torch

from metarun.errors import MetarunError
from metarun.io import atomic_torch_save, describe_write_failure
from metarun.runner.files import RunFiles
from metarun.runner.state import FORMAT, REQUIRED_KEYS, TrainState, format_version


class CheckpointWriteError(MetarunError):
    """A checkpoint could not be written (e.g. a full disk); the file's previous version is kept.
    `path`: the file; `reason`: what failed, e.g. 'no space left on device'."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"could not write the checkpoint {path}: {reason}")
        self.path, self.reason = Path(path), reason


def save_checkpoint(path: Path, state: TrainState | dict) -> None:
    """Writes `state` (a TrainState, or a dict of its fields) to `path` atomically; raises
    CheckpointWriteError when the write fails (the previous file stays as it was)."""
    blob = state.to_dict() if isinstance(state, TrainState) else {"format": FORMAT, **state}
    try:
        atomic_torch_save(blob, Path(path))
    except OSError as exc:
        raise CheckpointWriteError(path, describe_write_failure(exc)) from exc


def resolve_checkpoint_path(path: str | Path, setting: str) -> Path:
    """The checkpoint file `setting` (resume or checkpoint) names: a .pt file, or in a run dir its
    last.pt (resume continues the latest state) or best.pt (eval scores the best one)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = RunFiles(p)
        for file in (files.last, files.best) if setting == "resume" else (files.best, files.last):
            if file.is_file():
                return file
        raise MetarunError(
            f"{setting}={path} is a folder without {RunFiles.CHECKPOINTS}/{RunFiles.LAST} or "
            f"{RunFiles.BEST}: point {setting} at a run dir or a .pt file written by metarun train."
        )
    if not p.is_file():
        raise MetarunError(
            f"{setting}={path} does not exist: point {setting} at a checkpoint written by metarun "
            f"train (<run dir>/{RunFiles.CHECKPOINTS}/{RunFiles.LAST} or {RunFiles.BEST})."
        )
    return p


def _another(path: Path) -> str:
    """Where to look instead of a checkpoint whose tensors are not finite."""
    where = f"{RunFiles.CHECKPOINTS}/{RunFiles.TOP}/*.pt"
    if path.name == RunFiles.BEST:
        return f"another of the run's checkpoints ({where} or {RunFiles.LAST})"
    return f"an earlier checkpoint of the run ({RunFiles.CHECKPOINTS}/{RunFiles.BEST} or {where})"


def _read(p: Path):
    """torch.load(weights_only=True) of `p` on the CPU (raises what torch raises)."""
    return torch.load(p, map_location="cpu", weights_only=True)


def intact_alternative(path: Path, setting: str) -> tuple[Path, int] | None:
    """(file, iteration) of an intact checkpoint of the same run other than `path`: for resume
    the latest state (last.pt, then top/ newest first, then best.pt), for eval the best (best.pt,
    then top/, then last.pt); None when the run has none. Each candidate is read to be sure."""
    files = RunFiles.of_checkpoint(path).checkpoint_files()
    tops = [f for f in files if f.parent.name == RunFiles.TOP]
    last = [f for f in files if f.name == RunFiles.LAST and f.parent.name != RunFiles.TOP]
    best = [f for f in files if f.name == RunFiles.BEST and f.parent.name != RunFiles.TOP]
    order = last + tops + best if setting == "resume" else best + tops + last
    for candidate in order:
        if candidate.resolve() == Path(path).resolve():
            continue
        try:
            blob = _read(candidate)
        except Exception:  # another damaged file: try the next
            continue
        if format_version(blob) is not None and all(k in blob for k in REQUIRED_KEYS):
            return candidate, int(blob["iteration"])
    return None


def _unreadable(p: Path, setting: str, exc: Exception) -> MetarunError:
    """The error for a file torch cannot read (truncated, corrupt, not a torch file)."""
    text = str(exc).splitlines()[0] if str(exc) else "truncated or corrupt"
    found = intact_alternative(p, setting)
    if found is not None:
        other, iteration = found
        advice = (
            f"the run's intact checkpoint {other} (iteration {iteration}) can be used instead: "
            f"{setting}={other}"
        )
    else:
        advice = f"use another checkpoint written by metarun train ({setting}=PATH)"
    return MetarunError(
        f"{setting}={p} is not a readable checkpoint ({type(exc).__name__}: {text}); {advice}."
    )


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
    """Loads and checks a metarun checkpoint of any known version; returns its dict
    (TrainState.from_dict reads it). Every failure is a MetarunError naming the file and setting."""
    p = resolve_checkpoint_path(path, setting)
    what = _not_a_torch_file(p)
    if what:
        name = RunFiles.LAST if setting == "resume" else RunFiles.BEST
        raise MetarunError(
            f"{setting}={p} is not a checkpoint ({what}): point {setting} at a run dir or its "
            f"checkpoints/{name}, written by metarun train."
        )
    try:
        blob = _read(p)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any pickled object other than tensors and plain containers
        raise MetarunError(
            f"{setting}={p} was refused: it carries pickled objects that are not plain tensors "
            f"or containers, so it is not a metarun checkpoint and was not loaded "
            f"({str(exc).splitlines()[0]}). Only load checkpoints you trust, written by "
            "metarun train."
        ) from None
    except Exception as exc:
        raise _unreadable(p, setting, exc) from None
    if format_version(blob) is None:
        raise MetarunError(
            f"{setting}={p} is not a metarun checkpoint (no '{FORMAT}' marker or an earlier "
            f"version's): point {setting} at a file written by metarun train."
        )
    for key in REQUIRED_KEYS:
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


def load_state(path: str | Path, setting: str = "checkpoint") -> TrainState:
    """The TrainState of a checkpoint (load_checkpoint, then TrainState.from_dict)."""
    return TrainState.from_dict(load_checkpoint(path, setting))


def nonfinite_tensor(tree, name: str = "params") -> str | None:
    """The first floating tensor in a nested dict/list holding NaN or inf, described as e.g.
    "tensor 'params.conv0.weight' (1 of 72 values)", or None when all are finite."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            finite = torch.isfinite(tree)
            if not bool(finite.all()):
                return f"tensor '{name}' ({int((~finite).sum())} of {tree.numel()} values)"
        return None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        items = ()
    for key, value in items:
        found = nonfinite_tensor(value, f"{name}.{key}")
        if found:
            return found
    return None


def checkpoint_params(blob: dict, expected: dict, path, setting: str) -> dict:
    """The checkpoint's weights, refused unless they have exactly the names and shapes of
    `expected`."""
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
