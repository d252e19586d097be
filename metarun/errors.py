"""The one exception type a user is meant to see.

A MetarunError is a mistake the user can fix (a setting, a path, a file). The CLI prints its message
as one line, without a traceback, and exits with status 2. Every message names the setting or file
and the fix.
"""

import os
from pathlib import Path


class MetarunError(Exception):
    pass


def require_writable_dir(path: Path) -> None:
    """Creates `path` if needed and proves it writable with a probe file; else a MetarunError with
    the fix."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".metarun-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MetarunError(
            f"the output dir {path.resolve()} cannot be written ({exc.strerror}): run from a "
            "writable folder or set hydra.run.dir=/a/writable/path."
        ) from None
