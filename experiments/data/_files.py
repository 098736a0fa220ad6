"""Finding a data file, checking it against `SHA256SUMS`, and the cache directory.

A data directory holds files under subfolders (`mnist/`, `omniglot/`) and, optionally, a
`SHA256SUMS` at its root in `sha256sum` format. Exactly one data directory is used: `data_dir`
(`--data-dir`) when given, else `$BILEVAX_DATA` when set, else `../shared/data`; a file missing
there is an error, never looked up elsewhere, so that one run cannot mix files from two places.

A file listed in `SHA256SUMS` is hashed and compared before it is read; a file that cannot be
checked (no `SHA256SUMS`, or not listed) is read with an `UncheckedDataWarning`. Digests are
remembered in the cache directory by the file's path, size, mtime, ctime and inode, so only the
first run pays for hashing. A file that fails to parse raises `DataError` naming it.

Every file handed out is reported, with its SHA-256 (hashed even when it cannot be checked), to
the experiment run in progress (`record_reads`, which `experiments._harness.start` sets): if that
is the run's data directory, the run records it in its `run.json` and refuses to continue on a
file whose digest differs from the one it read before. The loaders know nothing of runs.
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import pathlib
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from .._atomic import atomic_write


PathLike = str | os.PathLike[str]
DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
SUMS = "SHA256SUMS"
_DIGESTS = "sha256.json"
# What a digest is remembered by: (resolved path, size, mtime_ns, ctime_ns, inode). Size and
# mtime alone are not enough: a same-size rewrite can restore its mtime (`os.utime`, `cp -p`,
# `rsync -t`, `tar x`). The ctime cannot be set from user space: every write, `utime`, rename or
# chmod moves it to the present, and a file replaced by another gets a new inode. So a changed
# file always misses the cache and is re-hashed, while an unchanged one costs only a `stat`,
# instead of re-reading ~100 MB for each Omniglot zip on every load (a spurious ctime change,
# e.g. from chmod, only costs one re-hash). Corruption below the filesystem (bit rot) keeps all
# five; `sha256sum -c SHA256SUMS` in the data directory, or deleting the cache, checks for that.
_Key = tuple[str, int, int, int, int]
_KEY_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino")
# Digests computed in this process.
_memo: dict[_Key, str] = {}
# Files handed out by `find` without a checksum check, for the messages of `reading`.
_unchecked: set[str] = set()
# Told of each file `find` hands out (see `record_reads`).
_recorder: Callable[[pathlib.Path, str, str], None] | None = None
# What a truncated or corrupt file raises from gzip, zipfile, zlib, numpy, json and PIL (whose
# PNG decoder raises `SyntaxError` on some broken chunks).
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    SyntaxError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
)


class DataError(ValueError):
    """A data file that is not what it should be: unreadable, truncated, corrupt, or not in the
    expected format. The message names the file."""


class ChecksumError(DataError):
    """A data file whose SHA-256 differs from the one `SHA256SUMS` lists."""


class UncheckedDataWarning(UserWarning):
    """A data file is read without a checksum check: its data directory has no `SHA256SUMS`,
    or that file does not list it."""


def cache_dir() -> pathlib.Path:
    """Where preprocessed arrays and file digests are kept: `$BILEVAX_CACHE`, else
    `$XDG_CACHE_HOME/bilevax`, else `~/.cache/bilevax`. Deleting it is always safe."""
    if env := os.environ.get("BILEVAX_CACHE"):
        return pathlib.Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "bilevax"


def data_root(data_dir: PathLike | None = None) -> tuple[pathlib.Path, str]:
    """The one data directory used, and where it came from (for messages): `data_dir` when
    given, else `$BILEVAX_DATA` when set and not empty, else `../shared/data`. The others are
    not consulted, so files from two places are never mixed."""
    if data_dir is not None:
        return pathlib.Path(data_dir), "given with `--data-dir` / `data_dir`"
    if env := os.environ.get("BILEVAX_DATA"):
        return pathlib.Path(env), "from `$BILEVAX_DATA`"
    return DEFAULT_DATA, "the default, as neither `--data-dir` nor `$BILEVAX_DATA` is set"


def data_dir(args: argparse.Namespace, require: str | None = None) -> pathlib.Path:
    """The one data directory of a run's command line: `--data-dir` if given, else
    `$BILEVAX_DATA` if set, else `../shared/data` next to the repository. Only the first of
    these that is set is looked at (see `data_root`), so one run never mixes files from two
    places.

    **Arguments:**

    - `args`: the parsed command line.
    - `require`: a folder that must exist inside it (e.g. `"mnist"`).

    **Returns:**

    The data directory (not joined with `require`).

    **Raises:**

    `FileNotFoundError`, naming the directory, where it came from, and how to choose another.
    """
    root, origin = data_root(getattr(args, "data_dir", None))
    path = root / require if require else root
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory (the data directory {root} is {origin}). Put the data "
            "there (see experiments/data), or choose another data directory with "
            "`--data-dir DIR` or `BILEVAX_DATA=DIR`."
        )
    return root


def record_reads(recorder: Callable[[pathlib.Path, str, str], None] | None) -> None:
    """Has `recorder(root, relpath, digest)` called for each file `find` hands out from now on:
    its data directory, its path there and its SHA-256 (`None`: no one). A run sets it when it
    starts, to record the data it is computed from (see `experiments._harness.record_data`)."""
    global _recorder
    _recorder = recorder


def _read_digests() -> dict:
    try:
        digests = json.loads((cache_dir() / _DIGESTS).read_text())
    except (OSError, ValueError):
        return {}
    return digests if isinstance(digests, dict) else {}


def sha256(path: PathLike) -> str:
    """The SHA-256 of a file as a hex string, read in chunks; remembered in memory and in the
    cache directory by (path, size, mtime, ctime, inode), so that an unchanged file is hashed
    once and a changed one, even with its size and mtime restored, is hashed again."""
    path = pathlib.Path(path).resolve()
    stat = path.stat()
    key: _Key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key in _memo:
        return _memo[key]
    digests = _read_digests()
    entry = digests.get(key[0])
    if (
        isinstance(entry, dict)
        and tuple(entry.get(f) for f in _KEY_FIELDS) == key[1:]
        and isinstance(entry.get("sha256"), str)
    ):
        digest = entry["sha256"]
    else:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        digests[key[0]] = {**dict(zip(_KEY_FIELDS, key[1:])), "sha256": digest}
        try:
            atomic_write(cache_dir() / _DIGESTS, json.dumps(digests, indent=0).encode())
        except OSError:
            pass  # A read-only cache only costs the hashing again next time.
    _memo[key] = digest
    return digest


def _expected(root: pathlib.Path, relpath: str) -> str | None:
    for line in (root / SUMS).read_text().splitlines():
        digest, _, name = line.strip().partition(" ")
        if name.lstrip(" *") == relpath:
            return digest.lower()
    return None


def find(relpath: str, data_dir: PathLike | None = None, *, download: str) -> pathlib.Path:
    """Locates a data file and checks its checksum.

    **Arguments:**

    - `relpath`: the file's path inside a data directory, e.g. `"mnist/t10k-labels-idx1-ubyte.gz"`.
    - `data_dir`: the data directory. When `None`, `$BILEVAX_DATA`, or `../shared/data` when
        that is not set. Only this one directory is looked at (see `data_root`).
    - `download`: where a user gets the file, for the error messages.

    **Returns:**

    The file's path. When the data directory has a `SHA256SUMS` that lists `relpath`, the file's
    SHA-256 matches it; otherwise an `UncheckedDataWarning` says that it was not checked. Either
    way the run in progress records `relpath` and its SHA-256 (see `record_reads`).

    **Raises:**

    `FileNotFoundError` naming the place looked at, why only that one, and the download address;
    `ChecksumError` naming the file, both digests and the download address; `RunError` (from
    the run in progress) if the run read this file before with another SHA-256.
    """
    root, origin = data_root(data_dir)
    path = root / relpath
    if not path.is_file():
        exists = "" if root.is_dir() else ", which does not exist"
        raise FileNotFoundError(
            f"Data file {relpath!r} not found: looked for {path}, in the data directory {root} "
            f"({origin}){exists}. Only this one directory is searched: `--data-dir` comes "
            "before `$BILEVAX_DATA`, which comes before `../shared/data`, and files are never "
            f"taken from two of them. Download the file from {download} into "
            f"`<DIR>/{pathlib.PurePosixPath(relpath).parent}/` and pass `--data-dir DIR` or set "
            "`BILEVAX_DATA=DIR`."
        )
    if not (root / SUMS).is_file():
        missing = f"{root / SUMS} does not exist"
        expected = None
    else:
        missing = f"{root / SUMS} does not list {relpath!r}"
        expected = _expected(root, relpath)
    if expected is None:
        _unchecked.add(str(path))
        warnings.warn(
            f"{path} is read without a checksum check: {missing}, so a corrupt or different "
            f"file would go unnoticed. The official files come from {download}; a `{SUMS}` in "
            f"`sha256sum` format at the root of {root} makes them checked.",
            UncheckedDataWarning,
            stacklevel=3,
        )
    elif (actual := sha256(path)) != expected:
        raise ChecksumError(
            f"{path} is corrupt or not the expected file: its SHA-256 is {actual}, but "
            f"{root / SUMS} lists {expected}. Download it again from {download}."
        )
    else:
        _unchecked.discard(str(path))
    digest = expected or sha256(path)
    if _recorder is not None:
        _recorder(root, relpath, digest)
    return path


@contextlib.contextmanager
def reading(path: PathLike, download: str | None = None) -> Iterator[None]:
    """Runs a body that reads `path`, and turns what gzip, zipfile, numpy, json or PIL raise on a
    truncated or corrupt file into a `DataError` that names the file, says whether `find`
    checked it, and gives `download`. The body's own `ValueError`s, which name the file, get the
    last two added."""
    try:
        yield
    except (DataError, FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # Already says what is wrong with which file.
    except _READ_ERRORS as error:
        named = str(path) in str(error)
        if named and (download is None or download in str(error)):
            raise
        message = (
            str(error).rstrip()
            if named
            else f"{path} could not be read: it is truncated, corrupt or not the expected file "
            f"({type(error).__name__}: {error})."
        )
        if str(path) in _unchecked:
            message += f" It was not checked against a `{SUMS}`."
        if download:
            message += f" Download it again from {download}."
        raise DataError(message) from error


def cache_key(digests: Mapping[str, str], params: Mapping[str, object]) -> str:
    """A short hash of the source files' digests and the preprocessing parameters."""
    text = json.dumps({"sources": dict(digests), "params": dict(params)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_cached(name: str) -> dict[str, np.ndarray] | None:
    """The arrays saved under `name` in the cache directory, or `None`."""
    path = cache_dir() / name
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # Missing, or left half-written by an older version: recompute.


def save_cached(name: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Saves `arrays` under `name` in the cache directory (uncompressed: loading is the point)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        atomic_write(cache_dir() / name, buffer.getvalue())
    except OSError:
        pass  # Without a writable cache every load preprocesses afresh; still correct.
