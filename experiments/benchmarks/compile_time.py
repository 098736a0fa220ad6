"""The first call: compile time of a hypergradient, bilevax against jaxopt on the same problem.

L2-regularised logistic regression on scikit-learn's breast cancer data (d = 30, one strength
per feature, float64), the hypergradient of the validation loss written the way each library's
documentation teaches it and compiled with `jax.jit(...).lower(...).compile()` from a cleared
cache (`jax.clear_caches()`), so nothing is reused between contenders:

- `jax.grad` through `bx.inner_solve` (gradient descent, then `optx.LBFGS`), the implicit
  adjoint at its default (`bx.CG`);
- `bx.implicit_hypergrad` at a given solution;
- `jax.grad` through `jaxopt.GradientDescent` / `jaxopt.LBFGS` with `implicit_diff=True`.

Each is compiled `REPEATS` times; the table gives the fastest, as process CPU seconds (what
compilation costs, steadier than wall-clock on a shared machine) and wall-clock seconds. The goal:
bilevax's compile time no more than jaxopt's for the same solver.

    python -m experiments.benchmarks.compile_time [--quick] [--out DIR]
"""

import time

import jax
import jax.numpy as jnp
import optimistix as optx

import bilevax as bx

from .. import _cli
from ..problems import logistic_loss as inner_loss, logistic_outer as outer_loss, relerr
from ._problems import breast_cancer
from ._timing import finish, format_table, outputs, parser


jax.config.update("jax_enable_x64", True)

NAME = "compile_time"
REPEATS = 3
TOL, MAX_STEPS = 1e-8, 2_000
AGREEMENT = (
    1e-4  # relative: jaxopt's default implicit-diff solve (normal-equation CG) stops at 1e-5
)
COLUMNS = ("solver", "contender", "cpu_s", "wall_s", "vs_jaxopt", "hypergrad_vs_jaxopt")


def compile_seconds(fn, *args):
    """The fastest of `REPEATS` compilations from a cleared cache: `(cpu_s, wall_s)`, and
    the compiled function."""
    best = (float("inf"), float("inf"))
    for _ in range(REPEATS):
        jax.clear_caches()
        cpu, wall = time.process_time(), time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        best = min(best, (time.process_time() - cpu, time.perf_counter() - wall))
    return (*best, compiled)


def contenders(train, val, d: int) -> list[tuple[str, str, object, tuple]]:
    """`(solver, contender, function, arguments)` for every compiled function."""
    w0, lam = jnp.zeros(d), jnp.zeros(d)

    def through_inner_solve(solver):
        def val_loss(lam):
            sol = bx.inner_solve(
                inner_loss, w0, lam, train, solver=solver, max_steps=MAX_STEPS, tol=TOL
            )
            return outer_loss(sol.params, lam, val)

        return jax.grad(val_loss)

    rows = [
        ("gradient descent", "bilevax", through_inner_solve(bx.GradientDescent(0.5)), (lam,)),
        ("L-BFGS", "bilevax", through_inner_solve(optx.LBFGS(TOL, TOL)), (lam,)),
        (
            "at a solution",
            "bilevax implicit_hypergrad",
            lambda w, lam: bx.implicit_hypergrad(outer_loss, inner_loss, w, lam, train, val),
            (w0, lam),
        ),
    ]
    try:
        import jaxopt
    except ImportError:
        print("skipped: jaxopt not installed (the jaxopt contenders)")
        return rows

    def through_jaxopt(solver):
        return jax.grad(lambda lam: outer_loss(solver.run(w0, lam, train).params, lam, val))

    gd = jaxopt.GradientDescent(
        fun=inner_loss, stepsize=0.5, tol=TOL, maxiter=MAX_STEPS, implicit_diff=True,
        acceleration=False,
    )  # fmt: skip
    lbfgs = jaxopt.LBFGS(fun=inner_loss, tol=TOL, maxiter=MAX_STEPS, implicit_diff=True)
    rows += [
        ("gradient descent", "jaxopt", through_jaxopt(gd), (lam,)),
        ("L-BFGS", "jaxopt", through_jaxopt(lbfgs), (lam,)),
    ]
    return rows


def main(argv=None) -> list[dict]:
    args = parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    out = outputs(args, NAME)
    (X, y), (Xv, yv) = breast_cancer()
    d = X.shape[1]
    train = (jnp.asarray(X), jnp.asarray(y))
    val = (jnp.asarray(Xv), jnp.asarray(yv))
    rows, hypergrads = [], {}
    for solver, contender, fn, fn_args in contenders(train, val, d):
        cpu_s, wall_s, compiled = compile_seconds(fn, *fn_args)
        rows.append(dict(solver=solver, contender=contender, cpu_s=cpu_s, wall_s=wall_s))
        hypergrads[solver, contender] = compiled(*fn_args)
    for row in rows:
        peer = [r for r in rows if r["solver"] == row["solver"] and r["contender"] == "jaxopt"]
        row["vs_jaxopt"] = row["cpu_s"] / peer[0]["cpu_s"] if peer else float("nan")
        if peer:  # what was compiled computes the same hypergradient as jaxopt's
            ours, theirs = (
                hypergrads[row["solver"], row["contender"]],
                hypergrads[row["solver"], "jaxopt"],
            )
            row["hypergrad_vs_jaxopt"] = float(relerr(ours, theirs))
            if row["hypergrad_vs_jaxopt"] > AGREEMENT:
                raise AssertionError(f"{row}: the hypergradients disagree with jaxopt's.")
    print(format_table(rows, COLUMNS))
    finish(args, NAME, out, {"rows": rows, "goal": "bilevax cpu_s <= jaxopt cpu_s"})
    return rows


if __name__ == "__main__":
    _cli.cli(main)
