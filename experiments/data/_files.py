"""Finding a data file, checking it against `SHA256SUMS`, and the cache directory.

A data directory holds files under subfolders (`mnist/`, `omniglot/`) and, optionally, a
`SHA256SUMS` at its root in `sha256sum` format. A file listed there is hashed and compared
before it is read; the result is remembered by (path, size, mtime) in the cache directory, so
only the first run pays for hashing.
"""

import hashlib
import io
import json
import os
import pathlib
from collections.abc import Mapping

import numpy as np

from .._common import DEFAULT_DATA, atomic_write


PathLike = str | os.PathLike[str]
SUMS = "SHA256SUMS"
_DIGESTS = "sha256.json"
# Digests computed in this process, keyed by (path, size, mtime_ns).
_memo: dict[tuple[str, int, int], str] = {}


class ChecksumError(ValueError):
    """A data file whose SHA-256 differs from the one `SHA256SUMS` lists."""


def cache_dir() -> pathlib.Path:
    """Where preprocessed arrays and file digests are kept: `$BILEVAX_CACHE`, else
    `$XDG_CACHE_HOME/bilevax`, else `~/.cache/bilevax`. Deleting it is always safe."""
    if env := os.environ.get("BILEVAX_CACHE"):
        return pathlib.Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "bilevax"


def data_roots(data_dir: PathLike | None = None) -> list[pathlib.Path]:
    """The data directories searched, in order: `data_dir`, `$BILEVAX_DATA`, `../shared/data`
    (the order of `experiments._common.data_dir`)."""
    roots = (data_dir, os.environ.get("BILEVAX_DATA"), DEFAULT_DATA)
    return [pathlib.Path(r) for r in roots if r is not None]


def _read_digests() -> dict:
    try:
        return json.loads((cache_dir() / _DIGESTS).read_text())
    except (OSError, ValueError):
        return {}


def sha256(path: PathLike) -> str:
    """The SHA-256 of a file as a hex string, read in chunks; remembered by (path, size, mtime)
    in memory and in the cache directory, so that an unchanged file is hashed once."""
    path = pathlib.Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _memo:
        return _memo[key]
    digests = _read_digests()
    entry = digests.get(key[0])
    if entry is not None and (entry.get("size"), entry.get("mtime_ns")) == key[1:]:
        digest = entry["sha256"]
    else:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        digests[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
        try:
            atomic_write(cache_dir() / _DIGESTS, json.dumps(digests, indent=0).encode())
        except OSError:
            pass  # A read-only cache only costs the hashing again next time.
    _memo[key] = digest
    return digest


def _expected(root: pathlib.Path, relpath: str) -> str | None:
    sums = root / SUMS
    if not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition(" ")
        if name.lstrip(" *") == relpath:
            return digest.lower()
    return None


def find(relpath: str, data_dir: PathLike | None = None, *, download: str) -> pathlib.Path:
    """Locates a data file and checks its checksum.

    **Arguments:**

    - `relpath`: the file's path inside a data directory, e.g. `"mnist/t10k-labels-idx1-ubyte.gz"`.
    - `data_dir`: searched first; then `$BILEVAX_DATA`, then `../shared/data`.
    - `download`: where a user gets the file, for the error messages.

    **Returns:**

    The file's path. When the data directory it was found in has a `SHA256SUMS` that lists
    `relpath`, the file's SHA-256 matches it.

    **Raises:**

    `FileNotFoundError` naming every place tried and the download address; `ChecksumError` naming
    the file, both digests and the download address.
    """
    tried = []
    for root in data_roots(data_dir):
        path = root / relpath
        if not path.is_file():
            tried.append(str(path))
            continue
        expected = _expected(root, relpath)
        if expected is not None and (actual := sha256(path)) != expected:
            raise ChecksumError(
                f"{path} is corrupt or not the expected file: its SHA-256 is {actual}, but "
                f"{root / SUMS} lists {expected}. Download it again from {download}."
            )
        return path
    raise FileNotFoundError(
        f"Data file {relpath!r} not found; looked for {', '.join(tried)}. Download it from "
        f"{download} into `<DIR>/{pathlib.PurePosixPath(relpath).parent}/` and pass "
        "`--data-dir DIR` or set `BILEVAX_DATA=DIR`."
    )


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
    except (OSError, ValueError, EOFError):
        return None  # Missing, or left half-written by an older version: recompute.


def save_cached(name: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Saves `arrays` under `name` in the cache directory (uncompressed: loading is the point)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        atomic_write(cache_dir() / name, buffer.getvalue())
    except OSError:
        pass  # Without a writable cache every load preprocesses afresh; still correct.
