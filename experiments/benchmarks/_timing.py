"""What the benchmarks share: compile time measured apart from run time, medians of repeated
runs, a plain-text table, and the JSON + PNG outputs.

A benchmark jits each contender with [`compile_and_time`][], which lowers and compiles once
(the compile time) and then reports the median of repeated, `block_until_ready`-ed calls of
the jitted function (the run time), so that neither tracing nor dispatch of the first call
leaks into the run time.
"""

import argparse
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import numpy as np

from .. import _cli, _environment, _harness, _outputs


@dataclass
class Timing:
    """Seconds: `compile_s` to trace, lower and compile; `run_s` the median of `runs` (each run
    is the mean over `number` back-to-back calls, to rise above timer resolution)."""

    compile_s: float
    run_s: float
    runs: list[float] = field(default_factory=list)
    number: int = 1

    @property
    def spread(self) -> float:
        """(max − min) / median over the repeats: how noisy `run_s` is."""
        return (max(self.runs) - min(self.runs)) / self.run_s if self.runs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}


def block(tree):
    """`block_until_ready` on every array leaf; returns `tree`."""
    return jax.block_until_ready(tree)


def compile_fn(fn: Callable, *args) -> tuple[Callable, float]:
    """`(jitted, seconds)`: `fn` jitted, then traced, lowered and compiled for `args` (the
    seconds). Calls of `jitted` with arguments like `args` reuse that compilation.

    The jitted function is what gets timed, not the ahead-of-time `Compiled` object: calling
    the latter skips jit's C++ fast path when the executable holds a host callback (as an
    `eqx.error_if` or lineax's `throw=True` puts there), which adds ~0.1 ms per call on CPU
    that no user pays."""
    jitted = jax.jit(fn)
    start = time.perf_counter()
    jitted.lower(*args).compile()
    return jitted, time.perf_counter() - start


def _calls_per_run(compiled: Callable, args, min_run_s: float, max_number: int) -> int:
    block(compiled(*args))  # warm-up: allocations, first-call caches
    start = time.perf_counter()
    block(compiled(*args))
    once = time.perf_counter() - start
    return int(min(max_number, max(1, np.ceil(min_run_s / max(once, 1e-9)))))


def _one_run(compiled: Callable, args, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        result = compiled(*args)
    block(result)
    return (time.perf_counter() - start) / number


def compile_and_time(
    fn: Callable,
    *args,
    repeats: int = 7,
    min_run_s: float = 0.05,
    max_number: int = 1000,
) -> tuple[Any, Timing]:
    """Jits `fn`, compiles it for `args` (timed apart), then times the compiled call.

    **Arguments:**

    - `fn`: a function of arrays.
    - `args`: its arguments; pass data as arguments, not closures, so that it is not baked into
        the executable as a constant.
    - `repeats`: the number of timed runs; the run time is their median.
    - `min_run_s`: fast calls are repeated `number` times per run so that a run lasts about
        this long (at most `max_number` calls).

    **Returns:**

    `(output, Timing)`, the output of one call.
    """
    out, timings = compare(
        {"fn": fn}, *args, repeats=repeats, min_run_s=min_run_s, max_number=max_number
    )
    return out["fn"], timings["fn"]


def compare(
    fns: dict[str, Callable],
    *args,
    repeats: int = 7,
    min_run_s: float = 0.05,
    max_number: int = 1000,
) -> tuple[dict[str, Any], dict[str, Timing]]:
    """As [`compile_and_time`][] for several contenders on the same arguments, with their
    timed runs interleaved (A B A B ...), so that a change in machine load (a shared CPU)
    falls on all of them alike.

    **Returns:**

    `(outputs, timings)`, dicts keyed like `fns`.
    """
    compiled, compile_s, number, outputs = {}, {}, {}, {}
    for name, fn in fns.items():
        compiled[name], compile_s[name] = compile_fn(fn, *args)
        outputs[name] = block(compiled[name](*args))
        number[name] = _calls_per_run(compiled[name], args, min_run_s, max_number)
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name in fns:
            runs[name].append(_one_run(compiled[name], args, number[name]))
    timings = {
        name: Timing(compile_s[name], statistics.median(runs[name]), runs[name], number[name])
        for name in fns
    }
    return outputs, timings


def paired_ratio(a: Timing, b: Timing) -> float:
    """The median over repeats of run time `a` / run time `b`, pairing the interleaved runs
    of [`compare`][]: steadier than a ratio of medians on a loaded machine."""
    return statistics.median(x / y for x, y in zip(a.runs, b.runs))


def marginal_time(make_fn: Callable[[int], Callable], *args, count: int = 20, **kwargs) -> float:
    """Seconds per call of an operation repeated inside one jitted function:
    `(t(count) − t(0)) / count`, where `make_fn(k)` returns a function doing it `k` times.
    Measures what one more application costs inside a loop (no dispatch, no setup). Uses the
    fastest run of each, the estimate least disturbed by other load on the machine."""
    _, timings = compare({"0": make_fn(0), "k": make_fn(count)}, *args, **kwargs)
    return max(min(timings["k"].runs) - min(timings["0"].runs), 0.0) / count


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table of `rows` (dicts) restricted to `columns`."""

    def fmt(value) -> str:
        if isinstance(value, float):
            if value == 0 or 1e-3 <= abs(value) < 1e4:
                return f"{value:.4g}"
            return f"{value:.2e}"
        return str(value)

    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda items: "  ".join(s.rjust(w) for s, w in zip(items, widths))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def header(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """What a benchmark's JSON starts with: its name, its configuration (the options, with
    the defaults resolved into `args`) and `environment()`: versions, git commit, devices."""
    config = {k: v for k, v in vars(args).items() if k not in _harness.HARNESS_OPTIONS}
    return {"benchmark": name, "config": config, "environment": _environment.environment()}


def finish(args: argparse.Namespace, name: str, out: pathlib.Path, payload: dict, plot=None):
    """Writes `<out>/<name>.json` (the `header`, then `payload`) and, given `plot`,
    `<out>/<name>.png` (`plot(path)`), and says where."""
    # Atomic, mode 0644; `Timing`s by their `to_dict`.
    paths = [_outputs.write_json(out / f"{name}.json", {**header(args, name), **payload})]
    if plot is not None:
        paths.append(plot(out / f"{name}.png"))
    print("wrote " + " and ".join(map(str, paths)), flush=True)


def log_axes(ax, xlabel: str, ylabel: str) -> None:
    """Log-log axes with labels and a light grid."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def bar_ratio_plot(
    path: pathlib.Path,
    labels: Sequence[str],
    times: dict[str, Sequence[float]],
    ratio: Sequence[float],
    *,
    ratio_name: str,
    goal: float | None = None,
    title: str = "",
) -> pathlib.Path:
    """Two panels: grouped bars of run time per contender (log scale), and the ratio per case
    with the goal as a dashed line."""
    plt = _outputs.pyplot()
    x = np.arange(len(labels))
    fig, (ax_time, ax_ratio) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.9 * len(labels) + 2), 7), sharex=True
    )
    width = 0.8 / max(len(times), 1)
    for i, (name, values) in enumerate(times.items()):
        ax_time.bar(x + (i - (len(times) - 1) / 2) * width, values, width, label=name)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("run time (s, median)")
    ax_time.legend()
    ax_time.set_title(title)
    ax_ratio.bar(x, ratio, 0.6, color="tab:green")
    if goal is not None:
        ax_ratio.axhline(goal, color="k", linestyle="--", label=f"goal ≤ {goal}")
        ax_ratio.legend()
    ax_ratio.axhline(1.0, color="grey", linewidth=0.8)
    ax_ratio.set_ylabel(ratio_name)
    ax_ratio.set_xticks(x, labels, rotation=30, ha="right")
    return _outputs.save_figure(fig, path)


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """`--quick`, `--out` (default: a new `runs/benchmarks-<date>-<time>`) and `--overwrite`,
    as every benchmark takes them (see `experiments._cli.parser`)."""
    module = f"benchmarks.{name}" if name else "benchmarks"
    return _cli.parser(module, description, resumable=False)


def outputs(args: argparse.Namespace, name: str) -> pathlib.Path:
    """The output directory of benchmark `name`, which writes `<name>.json` and `<name>.png`
    there: refused if they exist, unless `--overwrite`."""
    return _harness.claim_outputs(args, [f"{name}.json", f"{name}.png"])
