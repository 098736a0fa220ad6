"""What every experiment shares: command line, data location, checkpoints, progress, results.

An experiment builds its parser with `parser`, calls `setup` once, and then saves its
state with a `Checkpoints` after every step it cannot afford to lose, so that `--resume`
continues a killed run where it stopped.
"""

import argparse
import contextlib
import json
import os
import pathlib
import pickle
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import rich.console
import rich.progress

from . import _distributed
from ._distributed import is_main_process


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
# Progress goes to stderr so that stdout holds only the results.
console = rich.console.Console(stderr=True)


def parser(name: str, description: str, *, distributed: bool = False) -> argparse.ArgumentParser:
    """The command line every experiment accepts; add experiment-specific options to it.

    **Arguments:**

    - `name`: the experiment's name, used for the default output directory `runs/<name>`.
    - `description`: one line for `--help`.
    - `distributed`: whether the experiment runs as one process of many; adds
        `--distributed` and its options (see `experiments/_distributed.py`).

    **Returns:**

    An `argparse.ArgumentParser` with `--quick`, `--out`, `--data-dir`, `--seed`, `--resume`
    (and `--distributed`, `--coordinator-address`, `--num-processes`, `--process-id`).
    """
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="a small budget that runs in CPU minutes")
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("runs") / name,
        help=f"output directory (default: runs/{name})",
    )
    p.add_argument(
        "--data-dir",
        type=pathlib.Path,
        default=None,
        help="data directory (default: $BILEVAX_DATA, then ../shared/data)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints in --out instead of starting afresh",
    )
    if distributed:
        _distributed.add_arguments(p)
    p.set_defaults(name=name)
    return p


def setup(args: argparse.Namespace, *, x64: bool = True) -> pathlib.Path:
    """Creates the output directory and sets JAX's precision; call before building arrays.

    With `--distributed` it first joins the other processes (`jax.distributed.initialize`),
    and silences the console on every process but process 0, which alone writes files.

    **Returns:**

    The output directory.
    """
    if _distributed.initialize_from_args(args) and not is_main_process():
        console.quiet = True
    # Hypergradients are compared with closed forms to ~1e-8, which float32 cannot resolve.
    jax.config.update("jax_enable_x64", x64)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def data_dir(
    args: argparse.Namespace, subdir: str | None = None, *, download: str = ""
) -> pathlib.Path:
    """Where the data lives: `--data-dir`, then `$BILEVAX_DATA`, then `../shared/data`
    relative to the repository root.

    **Arguments:**

    - `args`: the parsed command line.
    - `subdir`: a folder that must exist inside the data directory (e.g. `"mnist"`).
    - `download`: where a user gets the files, for the error message.

    **Returns:**

    The data directory (joined with `subdir` if given).

    **Raises:**

    `FileNotFoundError`, naming every place tried and where to download the data.
    """
    tried = []
    for candidate in (args.data_dir, os.environ.get("BILEVAX_DATA"), DEFAULT_DATA):
        if candidate is None:
            continue
        path = pathlib.Path(candidate)
        if subdir is not None:
            path = path / subdir
        if path.is_dir():
            return path
        tried.append(str(path))
    where = f" Download it from {download} and" if download else " Put the data"
    raise FileNotFoundError(
        f"Data not found; tried {', '.join(tried)}.{where} pass its directory with "
        "`--data-dir DIR` or set `BILEVAX_DATA=DIR`."
    )


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    # Write beside the target and rename: a run killed mid-write leaves the old file intact.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


class Checkpoints:
    """Named pickled pytrees under `<out>/checkpoints/`, written atomically.

    JAX arrays are stored as NumPy arrays, so a checkpoint loads without a device and feeds
    back into jitted code unchanged (same dtypes, same values, hence the same trajectory).

    **Arguments:**

    - `out`: the experiment's output directory.
    - `resume`: whether `Checkpoints.load` returns what an earlier run saved; without it
        every run starts afresh (and overwrites the old checkpoints as it goes).
    """

    def __init__(self, out: pathlib.Path, resume: bool):
        self.directory = pathlib.Path(out) / "checkpoints"
        self.resume = resume

    def _path(self, name: str) -> pathlib.Path:
        return self.directory / f"{name}.pkl"

    def save(self, name: str, state: Any) -> None:
        """Stores the pytree `state` under `name` (process 0 only: with several processes the
        state is replicated, and every process loads process 0's copy on `--resume`)."""
        state = _distributed.to_host(state)
        if not is_main_process():
            return
        atomic_write(self._path(name), pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def load(self, name: str, default: Any = None) -> Any:
        """The state saved under `name` when resuming and one exists, else `default`."""
        path = self._path(name)
        if not (self.resume and path.exists()):
            return default
        with path.open("rb") as f:
            return pickle.load(f)


@contextlib.contextmanager
def progress(description: str, total: int, completed: int = 0) -> Iterator[Callable[..., None]]:
    """A rich progress bar. Yields `advance(info="")`, which moves it one step and shows
    `info` (e.g. the current loss) beside it."""
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


def _to_json(x: Any) -> Any:
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return np.asarray(x).tolist()
    if isinstance(x, pathlib.Path):
        return str(x)
    raise TypeError(f"Cannot write {type(x).__name__} to results.json.")


def write_results(out: pathlib.Path, results: dict) -> pathlib.Path:
    """Writes `results` to `<out>/results.json`, NumPy and JAX scalars and arrays as numbers
    and lists (on process 0 only).

    **Returns:**

    The path written.
    """
    path = pathlib.Path(out) / "results.json"
    if not is_main_process():
        return path
    text = json.dumps(results, indent=2, default=_to_json, allow_nan=True)
    atomic_write(path, (text + "\n").encode())
    return path
