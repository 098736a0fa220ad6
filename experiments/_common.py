"""The run harness every experiment and benchmark uses: command line, output directory, the
run's configuration, data-only checkpoints, resumable loops, progress and results.

An experiment builds its parser with `parser`, resolves its defaults into the parsed arguments,
then calls `start`, which returns a `Run`. Its work goes through `Run.loop` (a resumable loop,
checkpointed as it goes) and `Run.stage` (a result computed once and kept), hyperparameter
updates through `optax_step`, and its results and figures through `Run.finish`. A run
directory holds:

- `run.json`: the experiment, its run id (made at its first start), its configuration (every
    option that shapes the results, with the defaults resolved), the data files it read (each
    path in the data directory with its SHA-256), the versions, git commit and devices;
    written when the run starts, and as it reads data.
- `run.lock`: the file a live run holds a lock on (see `experiments/_claim.py`).
- `checkpoints/<name>.npz`: the state of each loop and stage (see `save_tree`), with the run id.
- `results.json` and the figures, when the run ends. `results.json` repeats the run id,
    configuration, data files and environment under `"run"`, with `"progress"`: for each
    loop, the step this invocation started from and the step it ended at.

The rules:

- Without `--out`, each run gets a new directory, `runs/<name>-<date>-<time>`, so running the
    same command twice never collides (`--resume` without `--out` picks the latest of them).
- One live run per directory: a run claims its directory before it looks at it, by an
    exclusive `flock` on `run.lock` held until its process ends. Of two runs started into one
    directory at the same instant, exactly one proceeds; the other gets a `RunError` saying
    that another run holds it, with `--resume` and `--overwrite` too. The operating system
    releases the lock when the process ends, crash or `kill -9` included, so a `--resume` of a
    run that died is never blocked. (With `--distributed`, process 0 claims it for all.)
- A directory that already holds a run (`run.json`, `results.json` or `checkpoints/`) is
    refused unless `--resume` (continue it) or `--overwrite` (delete its outputs first).
- `--resume` compares the configuration with the saved one and refuses any difference, naming
    each option and both values, except for the experiment's allow-list (`may_grow`: numbers
    that may only increase, such as more steps; `may_change`: options that do not change what
    has been computed, such as how often to checkpoint).
- A run is computed from one set of data: each data file that `experiments.data` hands out
    from the run's data directory is recorded with its SHA-256 (`record_data`, no code in the
    experiment), and a file whose SHA-256 differs from the one the run read before (a
    `--resume` with another `--data-dir`) is refused with a `RunError` naming the file and
    both digests. The same files in another directory are the same data. Data that is not
    read through `experiments.data` (scikit-learn's bundled sets) is not recorded.
- A checkpoint belongs to its run: each carries the run id of `run.json`, and one with
    another run's id (copied from another run's directory, such as another seed's) is refused
    with a `CheckpointError` naming it. The id is made at the first start and kept by
    `--resume`, allowed changes included, so a run continued for more steps keeps loading its
    own checkpoints. (A run from before run ids gets one on its next `--resume`, and its
    earlier checkpoints, which carry none, are still loaded.)
- Checkpoints hold data only: arrays in a `.npz` and the structure as JSON, never pickles, so
    opening a run directory someone shared runs no code. Every file is written atomically.

Every written file gets the usual mode (0644 under the usual umask).
"""

import argparse
import contextlib
import datetime
import io
import json
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax
import rich.console
import rich.progress

from . import _claim, _distributed
from ._distributed import is_main_process as is_main_process


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
RUNS = pathlib.Path("runs")  # where default output directories go, relative to the working dir
# Progress goes to stderr so that stdout holds only the results.
console = rich.console.Console(stderr=True)

RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
CHECKPOINTS = "checkpoints"
# Options of the harness itself: where things go and how the processes meet, not what is computed.
HARNESS_OPTIONS = frozenset(
    {
        "out",
        "resume",
        "overwrite",
        "data_dir",
        "name",
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
    }
)
_umask = os.umask(0)
os.umask(_umask)
FILE_MODE = 0o666 & ~_umask


class RunError(RuntimeError):
    """A run that cannot start or go on as asked: an output directory that holds another run
    (finished, or live in another process), or a `--resume` whose options or data differ from
    the saved run's. The message says what to do."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back: truncated, corrupt, not in the data-only format,
    not the state this run expects, or another run's. The message names the file."""


# -- command line ------------------------------------------------------------------------------


def parser(
    name: str, description: str, *, distributed: bool = False, resumable: bool = True
) -> argparse.ArgumentParser:
    """The command line every experiment accepts; add experiment-specific options to it.

    **Arguments:**

    - `name`: the experiment's module under `experiments` (e.g. `"ridge_l2"`,
        `"benchmarks.accuracy"`); its last part names the default output directories.
    - `description`: one line for `--help`.
    - `distributed`: whether the experiment runs as one process of many; adds
        `--distributed` and its options (see `experiments/_distributed.py`).
    - `resumable`: `False` for a run that keeps no checkpoints (a benchmark): no `--resume`,
        `--seed` or `--data-dir`.

    **Returns:**

    An `argparse.ArgumentParser` with `--quick`, `--out`, `--overwrite` and, when resumable,
    `--data-dir`, `--seed`, `--resume` (and `--distributed`, `--coordinator-address`,
    `--num-processes`, `--process-id`).
    """
    stem = name.split(".")[0] if name.startswith("benchmarks") else name
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="a small budget that runs in CPU minutes")
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help=f"output directory (default: a new runs/{stem}-<date>-<time>)",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what an earlier run left in --out, then start afresh",
    )
    if resumable:
        p.add_argument(
            "--data-dir",
            type=pathlib.Path,
            default=None,
            help="the data directory (default: $BILEVAX_DATA if set, else ../shared/data)",
        )
        p.add_argument("--seed", type=int, default=0)
        again.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out (default: the latest runs/"
            f"{stem}-*) with the same options",
        )
    if distributed:
        _distributed.add_arguments(p)
    p.set_defaults(name=stem)
    return p


def data_dir(args: argparse.Namespace, require: str | None = None) -> pathlib.Path:
    """The one data directory: `--data-dir` if given, else `$BILEVAX_DATA` if set, else
    `../shared/data` next to the repository. Only the first of these that is set is looked at
    (as `experiments.data` does), so one run never mixes files from two places.

    **Arguments:**

    - `args`: the parsed command line.
    - `require`: a folder that must exist inside it (e.g. `"mnist"`).

    **Returns:**

    The data directory (not joined with `require`).

    **Raises:**

    `FileNotFoundError`, naming the directory, where it came from, and how to choose another.
    """
    from .data._files import data_root

    root, origin = data_root(getattr(args, "data_dir", None))
    path = root / require if require else root
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory (the data directory {root} is {origin}). Put the data "
            "there (see experiments/data), or choose another data directory with "
            "`--data-dir DIR` or `BILEVAX_DATA=DIR`."
        )
    return root


# -- files -------------------------------------------------------------------------------------


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


def to_json(x: Any) -> Any:
    """`json.dumps`'s `default`: NumPy and JAX arrays and scalars as numbers and lists, paths
    as strings, dataclass-like objects with a `to_dict` by it."""
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return np.asarray(x).tolist()
    if isinstance(x, pathlib.Path):
        return str(x)
    if hasattr(x, "to_dict"):
        return x.to_dict()
    raise TypeError(f"Cannot write {type(x).__name__} to JSON.")


def write_json(path: pathlib.Path, obj: Any) -> pathlib.Path:
    """Writes `obj` as indented JSON, atomically (on process 0 only); returns the path."""
    path = pathlib.Path(path)
    if is_main_process():
        text = json.dumps(obj, indent=2, default=to_json, allow_nan=True)
        atomic_write(path, (text + "\n").encode())
    return path


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: pathlib.Path, dpi: int = 120) -> pathlib.Path:
    """Lays out `fig`, writes it as a PNG atomically (on process 0 only), and closes it."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    if is_main_process():
        atomic_write(pathlib.Path(path), buffer.getvalue())
    return pathlib.Path(path)


def environment() -> dict[str, Any]:
    """What the numbers were computed with: versions, the git commit, the devices."""
    import importlib.metadata as metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in (
        "bilevax",
        "jax",
        "jaxlib",
        "numpy",
        "equinox",
        "lineax",
        "optimistix",
        "optax",
        "optuna",
        "scikit-learn",
        "jaxopt",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    devices = jax.devices()
    return {
        "versions": versions,
        "git": commit or None,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "devices": {
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "count": len(devices),
            "processes": jax.process_count(),
            "list": [str(d) for d in devices],
        },
        "x64": bool(jax.config.read("jax_enable_x64")),
    }


# -- data-only checkpoints -----------------------------------------------------------------------

_FORMAT = "bilevax-experiments-checkpoint"
_VERSION = 1
_STRUCTURE = "__structure__"
_SCALARS = (bool, int, float, str, type(None))


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _encode(x, arrays: dict, where: str):
    if type(x) in _SCALARS:
        return x
    if _is_array(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            key = _encode(jax.random.key_data(x), arrays, where)
            return {"$key": key, "impl": str(jax.random.key_impl(x))}
        a = np.asarray(x)
        name = f"a{len(arrays)}"
        if a.dtype.kind == "O":
            raise TypeError(f"{where}: an object array cannot be checkpointed.")
        if a.dtype.isbuiltin == 1:  # a NumPy type: stored as is
            arrays[name] = a
            return {"$array": name}
        arrays[name] = a.view(f"u{a.dtype.itemsize}")  # bfloat16 and the like: their bits
        return {"$array": name, "dtype": a.dtype.name}
    if type(x) is dict:
        if not all(isinstance(k, str) for k in x):
            raise TypeError(f"{where}: checkpointed dicts need string keys.")
        return {"$dict": {k: _encode(v, arrays, f"{where}.{k}") for k, v in x.items()}}
    if type(x) in (list, tuple):
        items = [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(x)]
        return items if type(x) is list else {"$tuple": items}
    # Any other pytree (an Equinox module, an optax state): its leaves, rebuilt on loading from
    # the fresh state's node at the same place. Leaves that are neither arrays nor scalars
    # (functions held by a module) come from there too.
    leaves, treedef = jax.tree.flatten(x)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        raise TypeError(f"{where}: cannot checkpoint a {type(x).__name__}.")
    encoded = [
        _encode(v, arrays, f"{where}<{i}>") if _is_array(v) or type(v) in _SCALARS else {"$same": 1}
        for i, v in enumerate(leaves)
    ]
    return {"$tree": encoded, "type": type(x).__qualname__}


def _decode(node, arrays, like, where: str, path: pathlib.Path):
    def fail(message):
        raise CheckpointError(f"{path}: {where or 'the state'} {message}")

    if not isinstance(node, dict):
        if isinstance(node, list):
            likes = like if isinstance(like, list) else []
            return [
                _decode(v, arrays, likes[i] if i < len(likes) else None, f"{where}[{i}]", path)
                for i, v in enumerate(node)
            ]
        return node
    if "$dict" in node:
        likes = like if isinstance(like, dict) else {}
        return {
            k: _decode(v, arrays, likes.get(k), f"{where}.{k}".lstrip("."), path)
            for k, v in node["$dict"].items()
        }
    if "$tuple" in node:
        likes = like if isinstance(like, tuple) else ()
        return tuple(
            _decode(v, arrays, likes[i] if i < len(likes) else None, f"{where}[{i}]", path)
            for i, v in enumerate(node["$tuple"])
        )
    if "$array" in node:
        a = arrays[node["$array"]]
        if "dtype" in node:
            a = a.view(jax.numpy.dtype(node["dtype"]))
        if _is_array(like) and (np.shape(like) != a.shape or like.dtype != a.dtype):
            fail(
                f"is {a.dtype}{list(a.shape)} where this run has {like.dtype}"
                f"{list(np.shape(like))}: the checkpoint is from a run with other options."
            )
        return a
    if "$key" in node:
        data = _decode(node["$key"], arrays, None, where, path)
        return jax.random.wrap_key_data(data, impl=node["impl"])
    if "$tree" in node:
        if like is None:
            fail(f"holds a {node['type']} where this run's fresh state has nothing to match it.")
        like_leaves, treedef = jax.tree.flatten(like)
        if type(like).__qualname__ != node["type"] or len(like_leaves) != len(node["$tree"]):
            fail(
                f"holds a {node['type']} of {len(node['$tree'])} leaves where this run has a "
                f"{type(like).__qualname__} of {len(like_leaves)}."
            )
        leaves = [
            fresh if v == {"$same": 1} else _decode(v, arrays, fresh, f"{where}<{i}>", path)
            for i, (v, fresh) in enumerate(zip(node["$tree"], like_leaves))
        ]
        return jax.tree.unflatten(treedef, leaves)
    fail("is not in the checkpoint format.")


def save_tree(path: pathlib.Path, tree: Any, *, run_id: str | None = None) -> None:
    """Writes `tree` atomically as data only: a `.npz` of its arrays, with its structure as
    JSON inside. Dicts (string keys), lists, tuples, arrays, `None`, booleans, numbers and
    strings are stored as such; any other pytree node (an Equinox module, an optax state) by
    its leaves, and rebuilt by `load_tree` from a fresh state of the same shape.

    `run_id` (the run's id from `run.json`) is stored beside the structure, so that a
    checkpoint copied into another run's directory is recognised there (see `load_tree`)."""
    arrays: dict[str, np.ndarray] = {}
    structure = {"format": _FORMAT, "version": _VERSION, "tree": _encode(tree, arrays, "")}
    if run_id is not None:
        structure["run_id"] = run_id
    text = json.dumps(structure, allow_nan=True).encode()
    buffer = io.BytesIO()
    np.savez(buffer, **{_STRUCTURE: np.frombuffer(text, np.uint8)}, **arrays)
    atomic_write(path, buffer.getvalue())


def load_tree(
    path: pathlib.Path, like: Any = None, *, run_id: str | None = None, unmarked: bool = True
) -> Any:
    """Reads what `save_tree` wrote. Pytree nodes other than dicts, lists and tuples are rebuilt
    from `like` (the fresh state) at the same place, whose array shapes and dtypes must match.

    **Arguments:**

    - `path`: the file.
    - `like`: the fresh state.
    - `run_id`: the id of the run reading it; a checkpoint that another run wrote is refused
        (`None`: not checked).
    - `unmarked`: whether a checkpoint without a run id (written before run ids) is accepted.

    **Raises:**

    `CheckpointError`, naming the file, if it is truncated, corrupt, not in this format (a
    pickle is never loaded), another run's, or does not fit `like`.
    """
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            structure = json.loads(bytes(z[_STRUCTURE]).decode())
            arrays = {k: z[k] for k in z.files if k != _STRUCTURE}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: {error}). It may be "
            "truncated or corrupt; delete it, or start afresh with --overwrite."
        ) from error
    if not isinstance(structure, dict) or structure.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this format.")
    if structure.get("version") != _VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {structure.get('version')}.")
    if run_id is not None:
        _check_owner(path, structure.get("run_id"), run_id, unmarked)
    return _decode(structure["tree"], arrays, like, "", path)


def _check_owner(path: pathlib.Path, owner: Any, run_id: str, unmarked: bool) -> None:
    """Refuses a checkpoint of another run: copied from a run of the same experiment with
    other options (another seed), its arrays have the right shapes, so nothing else would
    notice that the resumed run continues someone else's state."""
    if owner == run_id or (owner is None and unmarked):
        return
    whose = "carries no run id" if owner is None else f"was written by run {owner}"
    raise CheckpointError(
        f"{path} belongs to another run: it {whose}, and this run's id (in {RUN_FILE}) is "
        f"{run_id}. It was copied from another run's directory: delete it (its state is then "
        "computed afresh), or resume the run it came from."
    )


class Checkpoints:
    """Named states under `<out>/checkpoints/`, in the data-only format of `save_tree`.

    JAX arrays are stored as NumPy arrays, so a checkpoint loads without a device and feeds
    back into jitted code unchanged (same dtypes, same values, hence the same trajectory).
    """

    def __init__(self, out: pathlib.Path, run_id: str | None = None, *, unmarked: bool = True):
        """`run_id`: the run's id, stored in every checkpoint saved and required of every
        checkpoint loaded (`None`: neither). `unmarked`: whether checkpoints without a run id
        (a run started before run ids) are loaded."""
        self.directory = pathlib.Path(out) / CHECKPOINTS
        self.run_id = run_id
        self.unmarked = unmarked

    def path(self, name: str) -> pathlib.Path:
        return self.directory / f"{name}.npz"

    def save(self, name: str, state: Any) -> None:
        """Stores `state` under `name` (process 0 only: with several processes the state is
        replicated, and every process loads process 0's copy on `--resume`)."""
        state = _distributed.to_host(state)
        if is_main_process():
            save_tree(self.path(name), state, run_id=self.run_id)

    def load(self, name: str, like: Any = None) -> Any:
        """The state saved under `name`, or `None` if there is none. `like` is a fresh state,
        the template for what is not a dict, list or tuple (see `load_tree`).

        **Raises:**

        `CheckpointError` for an unreadable file, for another run's (copied here), and for a
        pickle left by an older version (pickles can run code, so they are never opened).
        """
        path = self.path(name)
        if path.exists():
            return load_tree(path, like, run_id=self.run_id, unmarked=self.unmarked)
        legacy = path.with_suffix(".pkl")
        if legacy.exists():
            raise CheckpointError(
                f"{legacy}: a pickled checkpoint from an older version of the experiments. "
                "Pickles can run code, so they are not opened: start afresh with --overwrite."
            )
        return None


# -- the run -------------------------------------------------------------------------------------


def _normalise(config: Mapping) -> dict:
    """The configuration as JSON would give it back (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(dict(config), default=to_json))


def _holds_run(out: pathlib.Path) -> list[str]:
    return [n for n in (RUN_FILE, RESULTS_FILE, CHECKPOINTS) if (out / n).exists()]


def _claim_directory(out: pathlib.Path) -> None:
    """Claims `out` for this process until it ends (see `experiments/_claim.py`). Called before
    anything in `out` is looked at: of two runs started into one directory at the same instant,
    the second to claim it is refused, so that `run.json` and `results.json` describe one run.
    A run that died holds nothing, so `--resume` after a crash is never blocked."""
    try:
        _claim.claim(out)
    except _claim.DirectoryHeld as error:
        raise RunError(str(error)) from None


def _read_manifest(out: pathlib.Path) -> dict:
    """`run.json`, or `{}` if it is missing or unreadable."""
    try:
        manifest = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _update_manifest(out: pathlib.Path, **fields) -> None:
    """Sets `fields` in `run.json` (process 0 only), keeping the rest."""
    if is_main_process():
        write_json(out / RUN_FILE, {**_read_manifest(out), **fields})


def _default_out(name: str, resume: bool) -> pathlib.Path:
    """With `resume`, the latest `runs/<name>-*` that holds a run; else a new directory
    `runs/<name>-<date>-<time>[-<n>]`, created here so that two runs never share it."""
    if resume:
        runs = sorted(RUNS.glob(f"{name}-*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime_ns)
        if not runs:
            raise RunError(
                f"--resume without --out continues the latest {RUNS}/{name}-*, and there is "
                "none: pass the run's directory with --out."
            )
        return runs[-1].parent
    stamp = RUNS / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        out = stamp.with_name(stamp.name + (f"-{n}" if n > 1 else ""))
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:
            continue
    raise RunError(f"Cannot create a new directory {stamp}-<n>: pass --out.")


def _differences(saved: dict, now: dict, may_grow: Iterable[str], may_change: Iterable[str]):
    missing = object()
    differ = []
    for key in sorted(saved.keys() | now.keys()):
        old, new = saved.get(key, missing), now.get(key, missing)
        if old == new or key in may_change:
            continue
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new))
        if key in may_grow and numbers and new >= old:  # type: ignore[operator]
            continue
        show = lambda v: "(not set)" if v is missing else json.dumps(v)
        differ.append(f"  --{key.replace('_', '-')}: {show(old)} in the saved run, {show(new)} now")
    return differ


def claim_outputs(args: argparse.Namespace, files: Iterable[str]) -> pathlib.Path:
    """For a run without checkpoints (a benchmark): the output directory, claimed for this
    process (see `start`), refusing to replace any of `files` in it unless `--overwrite`.

    **Raises:**

    `RunError` naming the files that exist, or saying that another live run holds the
    directory.
    """
    if args.out is None:
        args.out = _default_out(args.name, resume=False)
    out = pathlib.Path(args.out)
    _claim_directory(out)
    existing = [f for f in files if (out / f).exists()]
    if existing and not args.overwrite:
        raise RunError(
            f"{out} already holds {', '.join(existing)}: pass --overwrite to replace them, or "
            "another --out."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def start(
    args: argparse.Namespace,
    *,
    may_grow: Iterable[str] = (),
    may_change: Iterable[str] = (),
    x64: bool = True,
) -> "Run":
    """Starts (or resumes) a run; call it once, before building arrays and before reading data,
    with the experiment's defaults resolved into `args` (e.g. `args.steps = args.steps or 100`).

    The configuration is every option in `args` but the harness's own (`--out`, `--resume`,
    `--overwrite`, `--data-dir` and the distributed ones). The output directory is claimed
    for this process first (another live run there is refused, `--resume` and `--overwrite`
    included). With `--distributed` it joins the other processes (`jax.distributed.initialize`)
    and silences the console on every process but process 0, which alone claims the directory
    and writes files. It sets JAX's precision to `x64`. The data files read from here on (by
    `experiments.data`) are recorded in `run.json` and checked on `--resume` (see
    `Run.record_data`).

    **Arguments:**

    - `args`: the parsed command line.
    - `may_grow`: options that `--resume` lets increase (e.g. `"steps"`: a finished run
        continued for more steps is the run that would have had them from the start).
    - `may_change`: options that `--resume` lets change freely (they do not change what has
        been computed, e.g. `"checkpoint_every"`).

    **Raises:**

    `RunError` if another live run holds `--out`, if `--out` holds a run and neither `--resume`
    nor `--overwrite` is given, or if `--resume` finds options that differ from the saved
    run's.
    """
    resume = bool(getattr(args, "resume", False))
    distributed = bool(getattr(args, "distributed", False))
    if args.out is None:
        if distributed:
            raise RunError("--distributed needs --out: every process must write to one place.")
        args.out = _default_out(args.name, resume)
    out = pathlib.Path(args.out)
    config = _normalise({k: v for k, v in vars(args).items() if k not in HARNESS_OPTIONS})
    if not distributed:
        _claim_directory(out)
    found = _holds_run(out)
    if found and not (resume or args.overwrite):
        raise RunError(
            f"{out} already holds a run ({', '.join(found)}). Pass --resume to continue it, "
            "--overwrite to replace it, or another --out."
        )
    resumed = bool(found) and resume
    manifest = _resumable_manifest(out, config, may_grow, may_change) if resumed else {}
    # Every process has checked the directory before any of them writes to it.
    if _distributed.initialize_from_args(args) and not is_main_process():
        console.quiet = True
    if distributed and is_main_process():
        _claim_directory(out)
        if _holds_run(out) != found:
            raise RunError(f"{out} changed while this run started: another run started there.")
    # Hypergradients are compared with closed forms to ~1e-8, which float32 cannot resolve.
    jax.config.update("jax_enable_x64", x64)
    run = _new_run(args, out, config, manifest, resumed=resumed)
    if is_main_process():
        if found and args.overwrite:
            run.clear()
        out.mkdir(parents=True, exist_ok=True)
        _save_manifest(run, manifest)
    if resume and not found:
        console.print(f"Nothing to resume in {out}: starting afresh.")
    elif resumed:
        console.print(f"Resuming {out}.")
    global _current_run
    _current_run = run
    return run


def _resumable_manifest(
    out: pathlib.Path, config: dict, may_grow: Iterable[str], may_change: Iterable[str]
) -> dict:
    """The saved `run.json` of the run that `--resume` continues, once its configuration is
    found to be `config` up to the allowed changes.

    **Raises:**

    `RunError` if `run.json` cannot be read, or naming each option that differs."""
    try:
        manifest = json.loads((out / RUN_FILE).read_text())
        saved = manifest["config"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RunError(
            f"{out / RUN_FILE} is missing or unreadable ({error}), so the run's options "
            "cannot be checked: start afresh with --overwrite, or use another --out."
        ) from error
    differ = _differences(saved, config, may_grow, may_change)
    if differ:
        raise RunError(
            f"Cannot resume {out}: these options differ from the saved run's:\n"
            + "\n".join(differ)
            + "\nResume with the saved options, or start a new run (another --out, or "
            "--overwrite)."
        )
    return manifest


def _new_run(
    args: argparse.Namespace, out: pathlib.Path, config: dict, manifest: dict, *, resumed: bool
) -> "Run":
    """The `Run`, with its identity: the id that its first start wrote in `run.json` (a new one
    for a new run, or for a run from before run ids, whose checkpoints carry none) and the data
    it has read, from its data directory. Not the configuration's hash: an allowed change on
    `--resume` (more steps) keeps the run, and its checkpoints, its own."""
    from .data._files import data_root

    run_id = manifest.get("run_id")
    unmarked = resumed and (run_id is None or bool(manifest.get("unmarked_checkpoints")))
    if run_id is None and is_main_process():
        run_id = uuid.uuid4().hex
    # Other processes of a new distributed run do not know process 0's new id: they check
    # nothing (they only read what process 0 wrote, which process 0 has checked).
    data = manifest.get("data") if isinstance(manifest.get("data"), dict) else {}
    root = data_root(getattr(args, "data_dir", None))[0].resolve()
    return Run(
        args.name,
        out,
        config,
        resumed=resumed,
        run_id=run_id,
        unmarked=unmarked,
        data=data,
        data_root=root,
    )


def _save_manifest(run: "Run", manifest: dict) -> None:
    """Writes `run.json`: afresh for a new run; for a resumed one, only what changed (an
    allowed change of options, or a run id for a run from before run ids)."""
    if not run.resumed:
        manifest = dict(
            experiment=run.name,
            run_id=run.run_id,
            started=_now(),
            config=run.config,
            data={},
            environment=environment(),
        )
        write_json(run.out / RUN_FILE, manifest)
        return
    changed = False
    if manifest["config"] != run.config:
        # An allowed change: the run is now the one with these options, and later resumes
        # compare with them (more steps, then fewer, is refused).
        change = dict(at=_now(), config=manifest["config"])
        manifest.setdefault("earlier_configs", []).append(change)
        manifest["config"] = run.config
        changed = True
    if manifest.get("run_id") != run.run_id:  # started before run ids: its checkpoints have none
        manifest.update(run_id=run.run_id, unmarked_checkpoints=True)
        changed = True
    if changed:
        write_json(run.out / RUN_FILE, manifest)


# The run that the data files read in this process belong to: the latest started, until it
# writes its results.
_current_run: "Run | None" = None


def record_data(root: pathlib.Path, name: str, digest: str) -> None:
    """Called by `experiments.data` for each data file it hands out (after its checksum check):
    the data directory, the file's path in it and its SHA-256. The current run records it (see
    `Run.record_data`) if `root` is the run's data directory, so every experiment that reads
    data gets its data's identity saved and checked on `--resume` without code of its own.
    Files read outside a run, or from another directory (a test's, or a notebook's, in a
    process where a run was started and not finished), are recorded nowhere."""
    run = _current_run
    if run is not None and run.data_root == pathlib.Path(root).resolve():
        run.record_data(name, digest)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class Run:
    """A started run (see `start`): its output directory, configuration and checkpoints.

    **Attributes:**

    - `out`: the output directory.
    - `config`: the configuration, as saved in `run.json`.
    - `resumed`: whether it continues an earlier run.
    - `run_id`: the id its first start wrote in `run.json`, stored in each of its checkpoints
        (`None` where unknown: other processes than 0 of a new distributed run).
    - `data`: the data files it has read, each path in the data directory with its SHA-256.
    - `data_root`: its data directory, resolved (`--data-dir`, else `$BILEVAX_DATA`, else
        `../shared/data`): only files read from there are its data.
    - `checkpoints`: its `Checkpoints`, which refuse another run's.
    - `progress`: for each loop and stage, where this invocation started it and where it
        ended (`{"from": k0, "to": k1}`, in steps; a stage has one): `to - from` is the work
        this invocation did, 0 for everything a resumed finished run reads back.
    """

    def __init__(
        self,
        name: str,
        out: pathlib.Path,
        config: dict,
        *,
        resumed: bool = False,
        run_id: str | None = None,
        unmarked: bool = True,
        data: Mapping[str, str] | None = None,
        data_root: pathlib.Path | None = None,
    ):
        self.name = name
        self.out = pathlib.Path(out)
        self.config = config
        self.resumed = resumed
        self.run_id = run_id
        self.data = dict(data or {})
        self.data_root = data_root
        self.checkpoints = Checkpoints(self.out, run_id, unmarked=unmarked)
        self.progress: dict[str, dict[str, int]] = {}
        self.outputs: list[str] = []

    def record_data(self, name: str, digest: str) -> None:
        """Records that the run read data file `name` (its path in the data directory) with
        SHA-256 `digest`, in `run.json` and later `results.json`.

        **Raises:**

        `RunError`, naming the file and both digests, if the run read it with another digest
        before: a `--resume` with another data directory (valid checksums, other data) would
        otherwise continue checkpoints computed from the old data on the new, giving results
        of neither."""
        known = self.data.get(name)
        if known == digest:
            return
        if known is not None:
            raise RunError(
                f"Cannot continue {self.out} on other data: the data file {name} has SHA-256 "
                f"{digest} now, but the run was computed with SHA-256 {known} (recorded in "
                f"{self.out / RUN_FILE}). Resume with the run's data directory (--data-dir or "
                "$BILEVAX_DATA as when it started), or start a new run (another --out, or "
                "--overwrite)."
            )
        self.data[name] = digest
        _update_manifest(self.out, data=self.data)

    def clear(self) -> None:
        """Deletes what a run left in `out`: checkpoints, `run.json`, `results.json` and the
        outputs `run.json` lists."""
        try:
            listed = json.loads((self.out / RUN_FILE).read_text()).get("outputs", [])
        except (OSError, ValueError, AttributeError):
            listed = []
        for name in [*listed, RUN_FILE, RESULTS_FILE]:
            if "/" not in name and name not in ("", ".", ".."):
                (self.out / name).unlink(missing_ok=True)
        shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)

    def loop(
        self,
        name: str,
        total: int,
        fresh: Callable[[], dict],
        step: Callable[[int, dict], tuple[dict, str]],
        *,
        description: str | None = None,
        every: int = 1,
        prepare: Callable[[dict], dict] | None = None,
        until: Callable[[dict], bool] | None = None,
    ) -> dict:
        """Runs `state, info = step(k, state)` for `k` from the checkpoint's step (0 when
        there is none) to `total`, saving the state under `name` every `every` steps and after
        the last, with a progress bar showing `info`.

        **Arguments:**

        - `name`: the checkpoint's name.
        - `total`: the number of steps.
        - `fresh`: the state at step 0, a dict (called on resume too: the template that the
            checkpoint's Equinox modules and optax states are rebuilt from).
        - `step`: one step; it may change `state` in place and must return it.
        - `description`: the progress bar's label (default `name`).
        - `every`: steps between checkpoints.
        - `prepare`: applied to the state before the first step (e.g. to put it on devices).
        - `until`: stop before `total` once `until(state)` holds (tested before every step,
            so a resumed loop that had stopped takes no step; e.g. a budget of wall-clock
            seconds, `lambda s: s["seconds"] >= budget`).

        **Returns:**

        The final state, with `"step"` (the steps done) and `"seconds"` (the time spent in
        `step`, over all invocations) added.
        """
        template = fresh()
        state = self.checkpoints.load(name, like=template)
        if state is None:
            state = dict(template, step=0, seconds=0.0)
        begin = int(state["step"])
        if begin > total:
            raise CheckpointError(
                f"{self.checkpoints.path(name)}: at step {begin}, beyond this run's {total}."
            )
        if prepare is not None:
            state = prepare(state)
        with progress(description or name, total, begin) as advance:
            for k in range(begin, total):
                if until is not None and until(state):
                    break
                tic = time.perf_counter()
                state, info = step(k, state)
                state["seconds"] += time.perf_counter() - tic
                state["step"] = k + 1
                stopping = k + 1 == total or (until is not None and until(state))
                if (k + 1) % every == 0 or stopping:
                    self.checkpoints.save(name, state)
                advance(info)
        self.progress[name] = {"from": begin, "to": int(state["step"])}
        return state

    def stage(self, name: str, compute: Callable[[], Any], like: Any = None) -> Any:
        """`compute()`, saved under `name`; a resumed run reads it back instead."""
        saved = self.checkpoints.load(name, like)
        self.progress[name] = {"from": int(saved is not None), "to": 1}
        if saved is not None:
            return saved
        result = compute()
        self.checkpoints.save(name, result)
        return result

    def path(self, filename: str) -> pathlib.Path:
        """`out / filename`, recorded as one of the run's outputs (so `--overwrite` deletes
        it)."""
        if filename not in self.outputs:
            self.outputs.append(filename)
        return self.out / filename

    def finish(self, results: dict, figures: Mapping[str, Callable] | None = None) -> dict:
        """Draws each figure (`figures[filename](path)`, on process 0 only), writes
        `results.json` (`write_results`), says where, and returns `results`."""
        written = []
        if is_main_process():
            for filename, draw in (figures or {}).items():
                draw(self.path(filename))
                written.append(self.out / filename)
        written.insert(0, self.write_results(results))
        console.print("Wrote " + ", ".join(map(str, written)))
        return results

    def write_results(self, results: dict) -> pathlib.Path:
        """Adds to `results` a `"run"` entry that makes it self-describing (the experiment, its
        run id, configuration and data files, when it started and finished, whether it was
        resumed, `progress`, and the versions and devices), and writes it to
        `<out>/results.json` (process 0 only).

        **Returns:**

        The path written.
        """
        manifest = _read_manifest(self.out)
        manifest.update(
            outputs=list(dict.fromkeys([*manifest.get("outputs", []), *self.outputs])),
            finished=_now(),
        )
        results["run"] = dict(
            experiment=self.name,
            run_id=self.run_id,
            config=self.config,
            data=self.data,
            started=manifest.get("started"),
            finished=manifest["finished"],
            resumed=self.resumed,
            progress=self.progress,
            environment=environment(),
        )
        write_json(self.out / RUN_FILE, manifest)
        global _current_run
        if _current_run is self:  # the run is over: data read from here on is not its
            _current_run = None
        return write_json(self.out / RESULTS_FILE, results)


def print_table(title: str, columns, rows, *, stdout: bool = True) -> None:
    """Prints a table (the first column left-aligned, the others right-aligned) of `rows`, each
    a sequence of strings: to stdout, as a run's result, or with `stdout=False` to stderr."""
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    (rich.console.Console(width=120) if stdout else console).print(table)


@contextlib.contextmanager
def progress(description: str, total: int, completed: int = 0) -> Iterator[Callable[..., None]]:
    """A rich progress bar. Yields `advance(info="")`, which moves it one step and shows
    `info` (e.g. the best loss so far) beside it."""
    columns = (
        rich.progress.TextColumn("{task.description:<16}"),
        rich.progress.BarColumn(),
        rich.progress.MofNCompleteColumn(),
        rich.progress.TimeElapsedColumn(),
        rich.progress.TextColumn("{task.fields[info]}"),
    )
    with rich.progress.Progress(*columns, console=console, disable=not is_main_process()) as bar:
        task = bar.add_task(description, total=total, completed=completed, info="")
        yield lambda info="": bar.update(task, advance=1, info=info)


# -- the hyperparameter update ------------------------------------------------------------------


def optax_step(optimizer: optax.GradientTransformation, grads, opt_state, params, *, project=None):
    """One update of `params` by an optax `optimizer`: `(params, opt_state)`, with the
    result passed through `project` (e.g. onto a box or the simplex) if given.

    It runs under JAX's standard dtype promotion, whatever the process's setting: optax mixes
    its int32 step count with floats (Adam's `b1**count`), and its projections mix integers
    and floats too, which strict promotion refuses."""
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if project is not None:
            params = project(params)
    return params, opt_state


def cli(main: Callable[[], Any]) -> None:
    """Runs `main()` as a command: a `RunError` or `CheckpointError` ends it with its message
    and exit status 2, not a traceback."""
    try:
        main()
    except (RunError, CheckpointError) as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise SystemExit(2) from None
