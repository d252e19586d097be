"""Run dirs: claimed atomically by one run, locked while it runs, removed again if a fresh run is
rejected.

A run dir belongs to the run that created its marker file (`.metarun-run`, created with O_EXCL, so
of two processes claiming the same dir in the same instant exactly one wins). The owner, and later
whoever resumes the run, holds an exclusive `flock` on the marker while running, so a run is never
continued by two processes at once. A dir that holds checkpoints without a marker (a run of an older
metarun) counts as claimed too.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import NamedTuple

from metarun.errors import MetarunError
from metarun.runner.files import RunFiles

MARKER = RunFiles.MARKER
_locks: dict[Path, int] = {}  # run dir -> open fd of its locked marker, held until the process ends


def _unwritable(path: Path, exc: OSError, setting: str) -> MetarunError:
    return MetarunError(
        f"the output dir {path} cannot be written ({exc.strerror or exc}): run from a writable "
        f"folder or set {setting}=/a/writable/path."
    )


def _lock(path: Path, fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise MetarunError(
            f"the run in {path} is being run by another metarun process right now: wait for it "
            "to end, or choose another hydra.run.dir."
        ) from None
    _locks[path] = fd


def _top_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what mkdir(parents=True) would
    create)."""
    top = None
    while not path.exists():
        top, path = path, path.parent
    return top


# The folders a run writes into: their contents are recorded when a run claims an existing folder,
# so that its clean-up can tell the user's files in them from the run's own.
RUN_FOLDERS = (RunFiles.HYDRA, RunFiles.TENSORBOARD, RunFiles.CHECKPOINTS)


class Claim(NamedTuple):
    """A claimed run dir: what `claim` returns and `remove_unused` undoes."""

    path: Path  # the claimed dir (absolute)
    created: Path | None  # the outermost folder the claim created; None: the dir existed
    before: frozenset[
        str
    ]  # relative paths the dir held before (its entries and RUN_FOLDERS' files)


def _contents(path: Path) -> frozenset[str]:
    """What an existing folder holds, as relative paths: its entries, and everything in its
    RUN_FOLDERS (a user's folder may be large: its other subfolders are never written by a run, so
    never listed)."""
    held = set()
    for entry in path.iterdir():
        held.add(entry.name)
        if entry.name in RUN_FOLDERS and entry.is_dir():
            held.update(str(p.relative_to(path)) for p in entry.rglob("*"))
    return frozenset(held)


def claim(path: Path, auto: bool, setting: str = "hydra.run.dir") -> Claim:
    """Claims a fresh run dir: `path`, or with `auto` (a generated name) the first free of path,
    path_2, path_3, ... Returns the Claim (the dir, the outermost folder this call created, what it
    held before). A dir already claimed by another run is a MetarunError naming it (without
    `auto`)."""
    path = Path(path).expanduser().absolute()
    candidate, n = path, 1
    while True:
        created = _top_missing(candidate)
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if RunFiles(candidate).checkpoints.exists():
                raise FileExistsError
            before = frozenset() if created is not None else _contents(candidate)
            fd = os.open(candidate / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if auto:
                n += 1
                candidate = path.with_name(f"{path.name}_{n}")
                continue
            hint = (
                f"continue that run with resume={path}, or "
                if RunFiles(path).last.is_file()
                else ""
            )
            raise MetarunError(
                f"{setting}={path} already belongs to another run: {hint}choose a new {setting}."
            ) from None
        except OSError as exc:
            raise _unwritable(path, exc, setting) from None
        os.write(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "argv": sys.argv,
                    "claimed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            ).encode(),
        )
        _lock(candidate, fd)
        return Claim(candidate, created, before)


def lock_existing(path: Path) -> Path:
    """Locks an existing run dir for its resume (a MetarunError if another process runs in it)."""
    path = Path(path).expanduser().absolute()
    try:
        fd = os.open(path / MARKER, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        raise _unwritable(path, exc, "hydra.run.dir") from None
    _lock(path, fd)
    return path


def remove_unused(claim: Claim) -> None:
    """After a fresh run was rejected: removes what it left, and only that. A dir its claim created
    goes with every folder the claim created (e.g. outputs/train/<time>, or outputs/ itself); in a
    folder that existed, only the entries the claim did not find there (the user's own files stay).
    Nothing is removed once the run had written a checkpoint (finished work is never deleted)."""
    path = Path(claim.path)
    if any((path / RunFiles.CHECKPOINTS).glob("*.pt")):
        return
    if claim.created is not None:
        shutil.rmtree(path, ignore_errors=True)
        # its parents only while empty: another run may have claimed a dir next to it meanwhile
        parent = path
        while parent != claim.created and claim.created in parent.parents:
            parent = parent.parent
            try:
                parent.rmdir()
            except OSError:
                break
        return
    _remove_new(path, path, claim.before)


def _remove_new(root: Path, folder: Path, before: frozenset[str]) -> None:
    """Removes what is in `folder` (below `root`) but not in `before`; descends into RUN_FOLDERS
    only."""
    for entry in folder.iterdir():
        name = str(entry.relative_to(root))
        if name not in before:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        elif entry.is_dir() and not entry.is_symlink() and name.split("/")[0] in RUN_FOLDERS:
            _remove_new(root, entry, before)
