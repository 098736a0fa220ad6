"""Unrolled hypergradients: peak memory and run time against the number of inner steps T.

The problem is logistic regression with one L2 strength per group of features (G groups, so
G hyperparameters), solved by T steps of gradient descent from zero; the outer loss is the
validation log-loss at w_T. For every T five contenders compute `bx.unrolled_hypergrad`:

- `full`: reverse mode through all T steps (memory O(T) states);
- `checkpoints`: reverse mode, `checkpoints=⌈√T⌉` (memory O(√T) states, one extra forward pass);
- `recursive`: reverse mode, `checkpoints="recursive"` (nested levels of 8 segments: memory
    O(log T) states, each step run forward at most ⌊log₈ T⌋ + 1 times);
- `truncate`: reverse mode through the last K = `TRUNCATE` steps only (Shaban et al. 2019):
    memory O(K) but a different (biased) hypergradient, whose distance to the full one is
    reported;
- `forward`: forward mode (ForwardHG), memory independent of T, cost linear in G.

and one peer, `treeverse`: the same unroll written by hand with equinox's online binomial
checkpointing (`equinox.internal.scan(kind="checkpointed")`, what optimistix's
`RecursiveCheckpointAdjoint` runs), ⌈log₂ T⌉ checkpoints, differentiated by `jax.grad`.

Before timing, `recursive` must agree with `full` to 1e-12 relative, and `checkpoints`,
`forward` and `treeverse` to 1e-9. After the last T, the growth of each contender's scratch
memory with T is fitted: the log-log slope over the two largest T (1 for O(T), ½ for O(√T),
about 0 for O(log T)), and for `recursive` a least-squares line in log₁₀ T with its R² and
the ratio of its memory at the two largest T next to the ratio of their logarithms.

Memory is what XLA says about the compiled executable
(`jax.jit(f).lower(...).compile().memory_analysis()`): `temp` is the scratch space the
program needs at its peak (the stored residuals of the scan live there); `peak` adds the
argument and output buffers (less any aliasing). Run time is the median of repeated calls,
the contenders' runs interleaved so that load from other processes falls on all alike;
compile time is reported apart.
"""

import math

import equinox.internal as eqxi
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
CONTENDERS = ("full", "checkpoints", "recursive", "truncate", "forward", "treeverse")
# The contenders that compute the full unroll's hypergradient, and how closely they must.
AGREE = {"recursive": 1e-12, "checkpoints": 1e-9, "forward": 1e-9, "treeverse": 1e-9}
STEPS = [10, 100, 1_000, 10_000, 100_000]


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
    if name == "treeverse":
        return treeverse(num_steps, learning_rate)
    options = {
        "full": {},
        "checkpoints": {"checkpoints": max(1, math.isqrt(num_steps - 1) + 1)},
        "recursive": {"checkpoints": "recursive"},
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


def treeverse(num_steps: int, learning_rate: float = 1.0):
    """The peer: `num_steps` gradient-descent steps through equinox's checkpointed scan (online
    binomial checkpointing, a `custom_vjp`: reverse mode only), ⌈log₂ T⌉ checkpoints."""
    checkpoints = max(1, math.ceil(math.log2(max(num_steps, 2))))

    def objective(lam, train, val, group):
        step = lambda w, _: (w - learning_rate * jax.grad(inner_loss)(w, lam, (train, group)), None)
        w0 = jnp.zeros(train[0].shape[1], train[0].dtype)
        w, _ = eqxi.scan(
            step, w0, None, length=num_steps, kind="checkpointed", checkpoints=checkpoints
        )
        return outer_loss(w, lam, val)

    return jax.value_and_grad(objective)


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
    for name, tolerance in AGREE.items():
        err = relerr(outs[name][1], full)
        if not err <= tolerance:
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
    by_name = {r["method"]: r for r in rows}
    full_row = by_name["full"]
    log(
        f"[T={num_steps}] full {full_row['temp_MB']:.3g} MB {full_row['run_s'] * 1e3:.3g} ms; "
        + "; ".join(
            f"{name} {by_name[name]['temp_MB']:.3g} MB, time x{by_name[name]['time_vs_full']:.2f}"
            for name in ("checkpoints", "recursive", "treeverse")
        )
        + " (temp memory)"
    )
    return rows


def memory_growth(rows) -> dict[str, dict]:
    """How each contender's scratch memory grows with T, from the rows of every T ≥ 100 (below
    that, fixed buffers dominate): the log-log slope between the two largest T, and a
    least-squares fit `temp = a + b log₁₀ T` with its R² and largest relative residual."""
    growth = {}
    for name in CONTENDERS:
        sub = sorted((r["T"], r["memory"]["temp"]) for r in rows if r["method"] == name)
        sub = [(T, temp) for T, temp in sub if T >= 100]
        if len(sub) < 2 or min(temp for _, temp in sub) <= 0:
            continue
        Ts, temps = np.array([T for T, _ in sub], float), np.array([t for _, t in sub], float)
        (T1, m1), (T2, m2) = sub[-2], sub[-1]
        slope, intercept = np.polyfit(np.log10(Ts), temps, 1)
        fitted = intercept + slope * np.log10(Ts)
        spread = np.sum((temps - temps.mean()) ** 2)
        # A memory that does not grow (truncation, forward mode) has no R² to speak of.
        r2 = float(1 - np.sum((temps - fitted) ** 2) / spread) if spread > 0 else None
        growth[name] = {
            "T": [int(T) for T in Ts],
            "temp_bytes": [int(t) for t in temps],
            "loglog_slope_last": math.log(m2 / m1) / math.log(T2 / T1),
            "memory_ratio_last": m2 / m1,
            "log_ratio_last": math.log(T2) / math.log(T1),
            "log_fit_bytes_per_decade": float(slope),
            "log_fit_intercept_bytes": float(intercept),
            "log_fit_r2": r2,
            "log_fit_max_rel_residual": float(np.max(np.abs(temps - fitted) / temps)),
        }
    return growth


def plot(path, rows):
    fig, (ax_mem, ax_time) = _outputs.pyplot().subplots(1, 2, figsize=(11, 4.2))
    for name in CONTENDERS:
        sub = [r for r in rows if r["method"] == name]
        Ts = [r["T"] for r in sub]
        ax_mem.plot(Ts, [r["temp_MB"] for r in sub], "o-", label=name)
        ax_time.plot(Ts, [r["run_s"] for r in sub], "o-", label=name)
    # Scratch memory, where the stored steps live: the peak adds the arguments and outputs,
    # the same for every contender, which would hide the smaller differences.
    memory_label = "scratch memory (MB, XLA memory analysis)"
    for ax, label in ((ax_mem, memory_label), (ax_time, "run time (s)")):
        log_axes(ax, "inner steps T", label)
    ax_mem.legend()
    ax_mem.set_title(f'checkpoints=⌈√T⌉ or "recursive", truncate={TRUNCATE}')
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
    problem = make_problem(n, d, groups)
    rows = []
    for num_steps in STEPS:
        rows += run_size(num_steps, problem, repeats=repeats, log=log)
    print()
    print(format_table(rows, COLUMNS))
    last = {r["method"]: r for r in rows if r["T"] == STEPS[-1]}
    print(f"\nn = {n}, d = {d}, G = {groups} hyperparameters, float64.")
    # The goals are those of one level of checkpoints; recursive ones trade time for memory.
    for name, goals in (("checkpoints", True), ("recursive", False)):
        row = last[name]
        print(
            f"at T = {STEPS[-1]}: {name} peak memory = {row['peak_vs_full']:.2%} of full"
            + (f" (goal ≤ {MEMORY_GOAL:.0%})" if goals else "")
            + f", time = {row['time_vs_full']:.2f}x full"
            + (f" (goal ≤ {TIME_GOAL}x)" if goals else "")
        )
    growth = memory_growth(rows)
    print("\nscratch memory against T (T ≥ 100):")
    for name, g in growth.items():
        r2 = "n/a" if g["log_fit_r2"] is None else f"{g['log_fit_r2']:.4f}"
        print(
            f"  {name:>11}: log-log slope {g['loglog_slope_last']:.3f} over the last two T "
            f"(memory x{g['memory_ratio_last']:.3g}); temp ≈ {g['log_fit_intercept_bytes']:.4g} "
            f"+ {g['log_fit_bytes_per_decade']:.4g} log10 T bytes, R² {r2}"
        )
    rec = growth.get("recursive")
    if rec is not None:
        print(
            f"recursive: memory x{rec['memory_ratio_last']:.3f} from T = {rec['T'][-2]} to "
            f"{rec['T'][-1]}, against log T x{rec['log_ratio_last']:.3f}; the log fit's largest "
            f"relative residual {rec['log_fit_max_rel_residual']:.1%}."
        )
    problem = {"n_train": n, "d": d, "hyperparameters": groups, "truncate": TRUNCATE}
    payload = {"problem": problem, "memory_goal": MEMORY_GOAL, "time_goal": TIME_GOAL}
    payload["memory_growth"] = growth
    finish(args, NAME, out, {**payload, "rows": rows}, lambda path: plot(path, rows))
    return rows


if __name__ == "__main__":
    _cli.cli(main)
