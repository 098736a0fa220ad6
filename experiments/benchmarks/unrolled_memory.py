"""Unrolled hypergradients: peak memory and run time against the number of inner steps T.

The problem is logistic regression with one L2 strength per group of features (G groups, so
G hyperparameters), solved by T steps of gradient descent from zero; the outer loss is the
validation log-loss at w_T. For every T four contenders compute `bx.unrolled_hypergrad`:

- `full`: reverse mode through all T steps (memory O(T) states);
- `checkpoints`: reverse mode, `checkpoints=⌈√T⌉` (memory O(√T) states, one extra forward pass);
- `truncate`: reverse mode through the last K = `TRUNCATE` steps only (Shaban et al. 2019):
    memory O(K) but a different (biased) hypergradient, whose distance to the full one is
    reported;
- `forward`: forward mode (ForwardHG), memory independent of T, cost linear in G.

Before timing, `checkpoints` and `forward` must agree with `full` to 1e-9 relative.

Memory is what XLA says about the compiled executable
(`jax.jit(f).lower(...).compile().memory_analysis()`): `temp` is the scratch space the
program needs at its peak (the stored residuals of the scan live there); `peak` adds the
argument and output buffers (less any aliasing). Run time is the median of repeated calls,
the contenders' runs interleaved so that load from other processes falls on all alike;
compile time is reported apart.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

import bilevax as bx

from .. import _cli, _outputs
from ..problems import log_loss as log_loss, logistic_outer as outer_loss, relerr
from ._problems import grouped_inner_loss as inner_loss
from ._timing import compare, finish, format_table, log_axes, outputs, parser


jax.config.update("jax_enable_x64", True)

NAME = "unrolled_memory"
MEMORY_GOAL = 0.05  # checkpointed peak memory / full peak memory at the largest T
TIME_GOAL = 2.0  # checkpointed run time / full run time at the largest T
TRUNCATE = 10
CONTENDERS = ("full", "checkpoints", "truncate", "forward")


def make_problem(n: int, d: int, groups: int, seed: int = 0):
    """`(train, val, group_of_feature, lam)`: Gaussian features, labels from a noisy teacher."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2 * n, d)) / np.sqrt(d)
    y = ((X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(2 * n)) > 0).astype(float)
    train = (jnp.asarray(X[:n]), jnp.asarray(y[:n]))
    val = (jnp.asarray(X[n:]), jnp.asarray(y[n:]))
    group = jnp.asarray(np.arange(d) % groups)
    lam = jnp.asarray(np.linspace(-3.0, -1.0, groups))
    return train, val, group, lam


def contender(name: str, num_steps: int, learning_rate: float = 1.0):
    """`(lam, train, val, group) -> (value, hypergrad)` for one contender at T = `num_steps`."""
    options = {
        "full": {},
        "checkpoints": {"checkpoints": max(1, math.isqrt(num_steps - 1) + 1)},
        "truncate": {"truncate": TRUNCATE},
        "forward": {"mode": "forward"},
    }[name]

    def fn(lam, train, val, group):
        d = train[0].shape[1]
        return bx.unrolled_hypergrad(
            outer_loss,
            inner_loss,
            jnp.zeros(d, train[0].dtype),
            lam,
            (train, group),
            val,
            solver=bx.GradientDescent(learning_rate),
            num_steps=num_steps,
            **options,
        )

    return fn


def memory_analysis(fn, *args) -> dict[str, int]:
    """Bytes XLA reserves for the compiled `fn(*args)`: `temp` (scratch at the peak), `args`,
    `output`, and `peak` = temp + args + output − aliased."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:  # a backend without the analysis
        return {"temp": -1, "args": -1, "output": -1, "peak": -1}
    temp = int(stats.temp_size_in_bytes)
    arguments = int(stats.argument_size_in_bytes)
    output = int(stats.output_size_in_bytes)
    alias = int(stats.alias_size_in_bytes)
    return {
        "temp": temp,
        "args": arguments,
        "output": output,
        "peak": temp + arguments + output - alias,
    }


def run_size(num_steps: int, problem, *, repeats: int, log) -> list[dict]:
    train, val, group, lam = problem
    args = (lam, train, val, group)
    fns = {name: contender(name, num_steps) for name in CONTENDERS}
    outs, times = compare(fns, *args, repeats=repeats, min_run_s=0.02)
    # After `compare`, so that its compile time is not a cache hit of this compilation.
    memory = {name: memory_analysis(fn, *args) for name, fn in fns.items()}
    full = outs["full"][1]
    for name in ("checkpoints", "forward"):
        err = relerr(outs[name][1], full)
        if not err <= 1e-9:
            raise AssertionError(f"[T={num_steps}] {name} differs from the full unroll: {err:.1e}")
    rows = []
    for name in CONTENDERS:
        rows.append(
            {
                "T": num_steps,
                "method": name,
                "peak_MB": memory[name]["peak"] / 1e6,
                "temp_MB": memory[name]["temp"] / 1e6,
                "peak_vs_full": memory[name]["peak"] / memory["full"]["peak"],
                "run_s": times[name].run_s,
                "time_vs_full": times[name].run_s / times["full"].run_s,
                "compile_s": times[name].compile_s,
                "err_vs_full": relerr(outs[name][1], full),
                "memory": memory[name],
                "timing": times[name].to_dict(),
            }
        )
    ck = rows[1]
    log(
        f"[T={num_steps}] full {rows[0]['peak_MB']:.3g} MB {rows[0]['run_s'] * 1e3:.3g} ms; "
        f"checkpoints {ck['peak_MB']:.3g} MB ({ck['peak_vs_full']:.1%}), "
        f"time x{ck['time_vs_full']:.2f}"
    )
    return rows


def plot(path, rows):
    fig, (ax_mem, ax_time) = _outputs.pyplot().subplots(1, 2, figsize=(11, 4.2))
    for name in CONTENDERS:
        sub = [r for r in rows if r["method"] == name]
        Ts = [r["T"] for r in sub]
        ax_mem.plot(Ts, [r["peak_MB"] for r in sub], "o-", label=name)
        ax_time.plot(Ts, [r["run_s"] for r in sub], "o-", label=name)
    for ax, label in ((ax_mem, "peak memory (MB, XLA memory analysis)"), (ax_time, "run time (s)")):
        log_axes(ax, "inner steps T", label)
    ax_mem.legend()
    ax_mem.set_title(f"checkpoints=⌈√T⌉, truncate={TRUNCATE}")
    return _outputs.save_figure(fig, path)


COLUMNS = [
    "T",
    "method",
    "peak_MB",
    "temp_MB",
    "peak_vs_full",
    "run_s",
    "time_vs_full",
    "compile_s",
    "err_vs_full",
]


def main(argv=None) -> list[dict]:
    args = parser(NAME, "unrolled hypergradients: memory and time against T").parse_args(argv)
    out = outputs(args, NAME)
    log = lambda message: print(message, flush=True)
    if args.quick:
        n, d, groups, repeats = 100, 200, 10, 3
    else:
        n, d, groups, repeats = 200, 500, 10, 5
    steps = [10, 100, 1_000, 10_000]
    problem = make_problem(n, d, groups)
    rows = []
    for num_steps in steps:
        rows += run_size(num_steps, problem, repeats=repeats, log=log)
    print()
    print(format_table(rows, COLUMNS))
    last = {r["method"]: r for r in rows if r["T"] == steps[-1]}
    ck = last["checkpoints"]
    print(
        f"\nat T = {steps[-1]}: checkpointed peak memory = {ck['peak_vs_full']:.1%} of full "
        f"(goal ≤ {MEMORY_GOAL:.0%}), time = {ck['time_vs_full']:.2f}x full (goal ≤ {TIME_GOAL}x)"
        f"; n = {n}, d = {d}, G = {groups} hyperparameters, float64."
    )
    problem = {"n_train": n, "d": d, "hyperparameters": groups, "truncate": TRUNCATE}
    payload = {"problem": problem, "memory_goal": MEMORY_GOAL, "time_goal": TIME_GOAL}
    finish(args, NAME, out, {**payload, "rows": rows}, lambda path: plot(path, rows))
    return rows


if __name__ == "__main__":
    _cli.cli(main)
