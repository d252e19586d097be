"""Writing files whole or not at all: the data caches, checkpoints and run records write here.

A write goes to a temporary file in the target's folder, is flushed to disk, then renamed over
the target (`os.replace`, atomic on POSIX): a kill, a crash or a full disk never leaves half a
file under the target's name, and the previous version stays readable until the new one is whole.

A failed write raises `OSError`, whatever wrote it: `torch.save` reports a full disk as a
`RuntimeError` ("[enforce fail at inline_container.cc:...] unexpected pos ...") raised while
handling the `OSError` (`ENOSPC`) of the underlying write; that `OSError` is raised instead, so
callers handle one exception type (the data caches fall back to memory, a checkpoint write stops
the run with one line).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# How torch's zip writer reports a failed write of its own (no OSError behind it).
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "failed writing")


def write_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write: `exc` itself, the OSError it was raised from or while
    handling (torch's RuntimeError on a full disk), or one made from torch's own write-failure
    text; None when `exc` is no failed write (a bug, e.g. an object that cannot be pickled)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(t in text for t in TORCH_WRITE_FAILURES):
        # fewer bytes reached the file than were written: in practice a full disk or quota
        reason = f"the write failed, most likely no space left on device ({text.splitlines()[0]})"
        return OSError(errno.EIO, reason)
    return None


def describe_write_failure(exc: OSError) -> str:
    """'no space left on device', 'permission denied', ...: an OSError's reason, lower case."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return reason[0].lower() + reason[1:]


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes `path` whole or not at all: `write(fh)` fills a temporary file in the same folder,
    which is flushed to disk and renamed over `path`. Raises OSError for a failed write (module
    docstring); the temporary file is removed and a previous `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would (a shared
        # cache or run dir stays readable by the group/others the umask allows)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failure = write_failure(exc) if isinstance(exc, Exception) else None
        if failure is None or failure is exc:
            raise
        if failure.__traceback__ is not None:  # torch's RuntimeError, raised while handling it
            raise failure from None
        raise failure from exc


def atomic_torch_save(obj, path: Path) -> None:
    """`torch.save(obj)` to `path`, whole or not at all (atomic_write)."""
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: Path, text: str) -> None:
    """`text` (UTF-8) to `path`, whole or not at all (atomic_write)."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
