"""One run per output directory: a run claims its directory by holding an exclusive `flock` on
`<out>/run.lock` for as long as its process lives.

A lock, not a claim file made with `O_EXCL`: the operating system releases it when the process
ends, however it ends (an exception, `kill -9`, a crash), so a run that died never leaves a
stale claim behind for `--resume` to trip over, and no one has to guess whether a process id
written in a file is still alive. The lock file itself stays; only the lock on it counts. Its
text says who holds it (process id, host, since when), for the message of a refused claim.

This module imports only the standard library, so that claiming costs no JAX import (the
harness's tests race two processes for one directory).
"""

import datetime
import fcntl
import os
import pathlib
import socket


LOCK_FILE = "run.lock"
# The directories this process holds: resolved path -> the open lock file's descriptor. A
# process that starts a run in a directory it already holds (a test resuming its own run, the
# benchmarks sharing one directory) keeps its claim instead of being refused by itself.
_held: dict[str, int] = {}


class DirectoryHeld(RuntimeError):
    """Another process holds the directory; the message names it and says who holds it."""


def claim(directory: str | os.PathLike[str]) -> pathlib.Path:
    """Claims `directory` (created if missing) for this process, until it ends.

    **Returns:**

    The lock file's path.

    **Raises:**

    `DirectoryHeld` if another process holds it: of two processes that claim one directory at
    the same instant, exactly one gets it.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    key = str(directory.resolve())
    if _still_held(key, path):
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise DirectoryHeld(
            f"Another run holds {directory} ({holder}): two runs writing to one directory would "
            "leave results.json and run.json describing different runs. Wait for it to end (a "
            "run that has died holds nothing, so --resume then works), or pass another --out."
        ) from None
    except BaseException:
        os.close(fd)
        raise
    _write_holder(fd)
    _held[key] = fd
    return path


def _still_held(key: str, path: pathlib.Path) -> bool:
    """Whether this process already holds the lock file at `path`. A directory deleted and made
    again since (a test's temporary directory) has a new lock file, which is not held."""
    fd = _held.get(key)
    if fd is None:
        return False
    try:
        held, now = os.fstat(fd), os.stat(path)
        if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            return True
    except OSError:
        pass
    del _held[key]
    os.close(fd)
    return False


def _write_holder(fd: int) -> None:
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    text = f"process {os.getpid()} on {socket.gethostname()} since {since}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not yet said which"
