"""The console: progress bars and tables. Progress goes to stderr so that stdout holds only the
results; on every process but process 0 of a distributed run it is silent."""

import contextlib
from collections.abc import Callable, Iterator

import rich.console
import rich.progress

from ._distributed import is_main_process


console = rich.console.Console(stderr=True)


def print_table(
    title: str, columns, rows, *, stdout: bool = True, caption: str | None = None
) -> None:
    """Prints a table (the first column left-aligned, the others right-aligned) of `rows`, each
    a sequence of strings: to stdout, as a run's result, or with `stdout=False` to stderr.

    The table is as wide as the terminal (`$COLUMNS`, else 80 columns when the output is not a
    terminal): rich wraps a cell only between words, so a table whose widest words fit keeps
    every number whole."""
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    (stdout_console() if stdout else console).print(table)


def stdout_console() -> rich.console.Console:
    """A console on stdout as wide as the terminal, made when called (so that it writes to the
    `sys.stdout` of the moment)."""
    return rich.console.Console()


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
