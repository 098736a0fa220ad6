"""Forward against reverse mode: run time against the number of hyperparameters.

The problem is logistic regression on d features with one L2 strength per group of features;
the number of groups H (the number of scalar hyperparameters) goes from 1 to d. Four
contenders compute the same kind of hypergradient:

- `unrolled_reverse` / `unrolled_forward`: `bx.unrolled_hypergrad` through T gradient steps,
    `mode="reverse"` (ReverseHG) or `mode="forward"` (ForwardHG);
- `implicit_reverse` / `implicit_forward`: `bx.implicit_hypergrad` at a minimiser w* (found
    once, apart, by Newton-CG), with `lx.CG`; reverse mode is one linear solve, forward mode
    one solve per hyperparameter.

Forward and reverse must agree before timing (1e-9 relative unrolled, 1e-6 implicit where
two CG solves stop at a tolerance). Forward mode costs about H Jacobian-vector products, so its
time grows linearly with H while reverse mode's stays flat: the crossover H is where to switch.
A forward contender whose time, extrapolated linearly from the previous H, would exceed
`--budget` seconds per call is skipped and marked so. Timed runs interleave the contenders.
"""

import functools

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

import bilevax as bx

from .. import _cli, _outputs
from ..problems import log_loss as log_loss, logistic_outer as outer_loss, relerr
from ._problems import grouped_inner_loss as inner_loss
from ._timing import compare, finish, format_table, log_axes, outputs, parser


jax.config.update("jax_enable_x64", True)

NAME = "forward_vs_reverse"
CONTENDERS = ("unrolled_reverse", "unrolled_forward", "implicit_reverse", "implicit_forward")
CG = lx.CG(rtol=1e-10, atol=1e-10, max_steps=1_000)


def make_problem(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2 * n, d)) / np.sqrt(d) * 3.0
    y = ((X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(2 * n)) > 0).astype(float)
    return (jnp.asarray(X[:n]), jnp.asarray(y[:n])), (jnp.asarray(X[n:]), jnp.asarray(y[n:]))


@functools.partial(jax.jit, static_argnames="iterations")
def newton(w, lam, data, iterations: int = 20):
    """Newton's method with a tight CG solve for the step (the inner problem is strongly
    convex and smooth): plain JAX, shared by no contender."""
    grad = lambda w: jax.grad(inner_loss)(w, lam, data)

    def step(w, _):
        g, hvp = jax.linearize(grad, w)
        direction, _ = jax.scipy.sparse.linalg.cg(hvp, -g, tol=1e-13, maxiter=4 * w.size)
        return w + direction, None

    w, _ = jax.lax.scan(step, w, None, length=iterations)
    return w, jnp.linalg.norm(grad(w))


def contenders(num_steps: int, learning_rate: float):
    def unrolled(mode):
        def fn(w0, lam, train, val, group):
            return bx.unrolled_hypergrad(
                outer_loss,
                inner_loss,
                jnp.zeros_like(w0),
                lam,
                (train, group),
                val,
                solver=bx.GradientDescent(learning_rate),
                num_steps=num_steps,
                mode=mode,
            )

        return fn

    def implicit(mode):
        def fn(w_star, lam, train, val, group):
            return bx.implicit_hypergrad(
                outer_loss,
                inner_loss,
                w_star,
                lam,
                (train, group),
                val,
                linear_solver=CG,
                mode=mode,
            )

        return fn

    return {
        "unrolled_reverse": unrolled("reverse"),
        "unrolled_forward": unrolled("forward"),
        "implicit_reverse": implicit("reverse"),
        "implicit_forward": implicit("forward"),
    }


def run_size(H, train, val, *, num_steps, learning_rate, repeats, skip, log) -> list[dict]:
    d = train[0].shape[1]
    group = jnp.asarray(np.arange(d) % H)
    lam = jnp.asarray(np.linspace(-2.0, 0.0, H))
    w_star, grad_norm = newton(jnp.zeros(d), lam, (train, group))
    fns = {k: v for k, v in contenders(num_steps, learning_rate).items() if k not in skip}
    outs, times = compare(fns, w_star, lam, train, val, group, repeats=repeats, min_run_s=0.02)
    errors = {}
    for family, bound in (("unrolled", 1e-9), ("implicit", 1e-6)):
        fwd, rev = f"{family}_forward", f"{family}_reverse"
        if fwd in outs:
            errors[family] = relerr(outs[fwd][1], outs[rev][1])
            if not errors[family] <= bound:
                raise AssertionError(f"[H={H}] {family} forward and reverse differ: {errors}")
    rows = []
    for name in CONTENDERS:
        family, mode = name.split("_")
        row = {"H": H, "family": family, "mode": mode, "skipped": name not in fns}
        if name in fns:
            reverse = times[f"{family}_reverse"].run_s
            row |= {
                "run_s": times[name].run_s,
                "vs_reverse": times[name].run_s / reverse,
                "compile_s": times[name].compile_s,
                "fwd_vs_rev_err": errors.get(family, float("nan")),
                "timing": times[name].to_dict(),
            }
        rows.append(row)
    log(
        f"[H={H}] "
        + ", ".join(
            f"{r['family']}/{r['mode']} "
            + ("skipped" if r["skipped"] else f"{r['run_s'] * 1e3:.3g} ms")
            for r in rows
        )
        + f"; ‖∇L(w*)‖ = {float(grad_norm):.1e}"
    )
    return rows


def crossover(rows, family: str) -> int | None:
    """The smallest H at which forward mode is slower than reverse mode, if any."""
    for row in rows:
        if row["family"] == family and row["mode"] == "forward":
            if row["skipped"] or row["vs_reverse"] > 1.0:
                return row["H"]
    return None


def plot(path, rows):
    fig, ax = _outputs.pyplot().subplots(figsize=(6.5, 4.5))
    styles = {"reverse": "o-", "forward": "s--"}
    colours = {"unrolled": "tab:blue", "implicit": "tab:orange"}
    for name in CONTENDERS:
        family, mode = name.split("_")
        sub = [r for r in rows if r["family"] == family and r["mode"] == mode and not r["skipped"]]
        ax.plot(
            [r["H"] for r in sub],
            [r["run_s"] for r in sub],
            styles[mode],
            color=colours[family],
            label=f"{family}, {mode}",
        )
    log_axes(ax, "number of scalar hyperparameters H", "run time (s, median)")
    ax.legend()
    ax.set_title("hypergradient: forward vs reverse mode")
    return _outputs.save_figure(fig, path)


COLUMNS = ["H", "family", "mode", "run_s", "vs_reverse", "compile_s", "fwd_vs_rev_err", "skipped"]


def main(argv=None) -> list[dict]:
    p = parser(NAME, "forward vs reverse mode against the number of hyperparameters")
    p.add_argument(
        "--budget", type=float, default=10.0, help="skip a forward call predicted over this (s)"
    )
    args = p.parse_args(argv)
    out = outputs(args, NAME)
    log = lambda message: print(message, flush=True)
    if args.quick:
        n, d, num_steps, repeats = 100, 1_000, 20, 3
        sizes = [1, 10, 100, 1_000]
    else:
        n, d, num_steps, repeats = 200, 10_000, 20, 3
        sizes = [1, 10, 100, 1_000, 10_000]
    train, val = make_problem(n, d)
    X = np.asarray(train[0])
    learning_rate = 1.0 / (0.25 * np.linalg.norm(X, 2) ** 2 / n + 1.0)
    rows, skip = [], set()
    for H in sizes:
        rows += run_size(
            H,
            train,
            val,
            num_steps=num_steps,
            learning_rate=learning_rate,
            repeats=repeats,
            skip=skip,
            log=log,
        )
        for row in rows[-len(CONTENDERS) :]:
            name = f"{row['family']}_{row['mode']}"
            if not row["skipped"] and row["run_s"] * 10 > args.budget:  # next H is 10x
                skip.add(name)
    print()
    print(format_table(rows, COLUMNS))
    cross = {family: crossover(rows, family) for family in ("unrolled", "implicit")}
    print(
        f"\nvs_reverse = run time / the same family's reverse-mode run time. Forward mode is "
        f"first slower than reverse at H = {cross['unrolled']} (unrolled, T = {num_steps}) and "
        f"H = {cross['implicit']} (implicit); n = {n}, d = {d}, float64."
    )
    problem = {"n_train": n, "d": d, "num_steps": num_steps}
    payload = {"problem": problem, "crossover": cross, "rows": rows}
    finish(args, NAME, out, payload, lambda path: plot(path, rows))
    return rows


if __name__ == "__main__":
    _cli.cli(main)
