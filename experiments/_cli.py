"""The command line every experiment and benchmark accepts, and running `main` as a command."""

import argparse
import pathlib
from collections.abc import Callable
from typing import Any

from . import _distributed
from ._checkpoint import CheckpointError
from ._console import console
from ._harness import RunError


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


def cli(main: Callable[[], Any]) -> None:
    """Runs `main()` as a command: a `RunError` or `CheckpointError` ends it with its message
    and exit status 2, not a traceback."""
    try:
        main()
    except (RunError, CheckpointError) as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise SystemExit(2) from None
