"""Atomic file writes, and the mode every written file gets (0644 under the usual umask).

This module imports only the standard library: the data loaders (`experiments/data/`) write
their cache through it without importing the run harness.
"""

import os
import pathlib
import tempfile


_umask = os.umask(0)
os.umask(_umask)
FILE_MODE = 0o666 & ~_umask


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` beside `path` and renames it into place, so that a run killed mid-write
    leaves the old file (or none), never a partial one; the temporary file is removed on any
    failure. The file gets the usual mode (`0666` less the umask)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
