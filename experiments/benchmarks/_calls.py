"""Interleaved timing of plain Python callables (a PyTorch contender, a Python loop over jitted
calls), as [`_timing.compare`][] does for jitted JAX functions."""

import statistics
import time
from collections.abc import Callable

from ._timing import Timing


def time_calls(
    calls: dict[str, Callable[[], object]],
    *,
    compile_s: dict[str, float] | None = None,
    repeats: int = 7,
    min_run_s: float = 0.05,
    max_number: int = 1000,
) -> dict[str, Timing]:
    """Median run time of each zero-argument callable, which must block until its result is
    ready (`jax.block_until_ready`, or a PyTorch call on CPU). Each is warmed up once, repeated
    `number` times per run so that a run lasts about `min_run_s`, and the contenders' runs are
    interleaved (A B A B ...) so that other load on the machine falls on all alike.

    **Arguments:**

    - `calls`: name -> callable.
    - `compile_s`: name -> seconds spent compiling beforehand, recorded in the `Timing`.
    - `repeats`, `min_run_s`, `max_number`: as in `_timing.compare`.

    **Returns:**

    name -> `Timing`.
    """
    compile_s = compile_s or {}
    number = {}
    for name, call in calls.items():
        call()  # warm-up
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        number[name] = int(min(max_number, max(1, -(-min_run_s // max(once, 1e-9)))))
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(number[name]):
                call()
            runs[name].append((time.perf_counter() - start) / number[name])
    return {
        name: Timing(
            compile_s.get(name, 0.0), statistics.median(runs[name]), runs[name], number[name]
        )
        for name in calls
    }
