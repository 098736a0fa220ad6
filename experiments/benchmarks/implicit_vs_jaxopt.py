"""Implicit hypergradients: `bx.implicit_hypergrad` against jaxopt's implicit differentiation.

The problem is L2-regularised logistic regression with the regularisation as hyperparameter,
either one strength or one per feature:

    L(w, λ) = mean log-loss(X_train w, y_train) + ½ Σ_i exp(λ_i) w_i²,
    E(w, λ) = mean log-loss(X_val w, y_val),

on scikit-learn's breast cancer data (d = 30, standardised) and synthetic problems with
d = 2,000 and (without `--quick`) d = 100,000. `w*` is computed once, to a gradient norm near
machine precision, by a damped Newton-CG that belongs to neither contender. Both contenders get
the same `w*`, float64, conjugate gradients on H = ∇²_w L applied by Hessian-vector products,
and are jitted with the data as arguments:

- bilevax: `bx.implicit_hypergrad(E, L, w*, λ, train, val, linear_solver=lx.CG(...))`;
- jaxopt: `jax.value_and_grad` of `E(solver(w*, λ, train), λ, val)`, where `solver` returns
  `w*` and is wrapped in `jaxopt.implicit_diff.custom_root(∇_w L, solve=solve_cg)`.

The two CG implementations stop differently (lineax: max-norm, per-component scale
`atol + rtol·|b_i|`, checked on both the residual and the last update; jax.scipy: 2-norm of the
residual against `tol·‖b‖₂`), so two settings are timed:

- `iters`: the same number K of CG iterations on both sides (lineax `rtol = atol = 0,
  max_steps = K`; jaxopt `tol = 0, maxiter = K`), K being what jaxopt needs for `tol`. Both
  then compute the same Krylov iterate, so this is the like-for-like cost comparison.
- `tol`: each library's own tolerance semantics with the same number (`lx.CG(tol, tol)`,
  `solve_cg(tol=tol)`); iterations and achieved accuracy are reported next to the times.

Before timing, both hypergradients are checked against each other and, where d is small enough
for a dense Hessian, against a dense solve. The number of Hessian-vector products (HVPs) is
counted (lineax's `num_steps` plus its initial residual and its re-computed residual every
`stabilise_every` steps; jaxopt's by counting `matvec` calls in an un-timed copy), one HVP is
timed inside a loop (the linearised HVP each CG step applies), and
`run time / (HVP count × HVP time)` says how close each is to the cost of its HVPs alone.
"""

import math
import time

import jax
import jax.numpy as jnp
import lineax as lx

import bilevax as bx

from .. import _cli
from ..problems import logistic_loss as inner_loss, logistic_outer as outer_loss, relerr
from ._problems import (
    DENSE_MAX_D,
    bilevax_hypergrad,
    dense_reference,
    hessian_operator,
    lineax_steps,
    make_cases,
    newton_cg,
)
from ._timing import (
    bar_ratio_plot,
    compare,
    finish,
    format_table,
    marginal_time,
    outputs,
    paired_ratio,
    parser,
)


jax.config.update("jax_enable_x64", True)

NAME = "implicit_vs_jaxopt"
RATIO_GOAL = 0.67  # bilevax run time / jaxopt run time
HVP_GOAL = 1.2  # run time / (HVP count × HVP time)
# lineax's CG recomputes the residual from scratch every `stabilise_every` steps (an HVP).
STABILISE_EVERY = lx.CG(0.0, 0.0, max_steps=1).stabilise_every


# -- the contenders (the problems, `w*`, the dense reference and bilevax's: `_problems`) --------


def jaxopt_hypergrad(cg_kwargs, count=None):
    """jaxopt's `custom_root` around a solver that returns `w*`; `count`, when given, is called
    (through `jax.debug.callback`) once per `matvec` of the CG solve."""
    from jaxopt.implicit_diff import custom_root
    from jaxopt.linear_solve import solve_cg

    def solve(matvec, b):
        if count is not None:
            plain = matvec

            def matvec(u):
                jax.debug.callback(count)
                return plain(u)

        return solve_cg(matvec, b, **cg_kwargs)

    optimality_fun = jax.grad(inner_loss)

    @custom_root(optimality_fun, solve=solve)
    def solver(init, lam, data):
        del lam, data
        return jax.lax.stop_gradient(init)

    def fn(w, lam, train, val):
        objective = lambda lam: outer_loss(solver(w, lam, train), lam, val)
        return jax.value_and_grad(objective)(lam)

    return fn


def lineax_hvps(steps: int) -> int:
    """HVPs in `steps` lineax CG iterations: one per step, one for the initial residual, one
    per re-computed residual."""
    return steps + 1 + (steps // STABILISE_EVERY if STABILISE_EVERY else 0)


def jaxopt_hvps(cg_kwargs, w, lam, train, val) -> int:
    calls = []
    fn = jax.jit(jaxopt_hypergrad(cg_kwargs, count=lambda: calls.append(1)))
    jax.block_until_ready(fn(w, lam, train, val))
    return len(calls)


def hvp_times(w, lam, train, count: int) -> dict[str, float]:
    """Seconds per linearised HVP inside a loop: lineax's (forward-over-reverse, as
    `lx.linearise` builds it for bilevax) and jaxopt's (the VJP of ∇_w L)."""

    def lineax_loop(k):
        def fn(w, lam, train):
            op = lx.linearise(hessian_operator(w, lam, train))
            body = lambda _, v: (lambda u: u / jnp.max(jnp.abs(u)))(op.mv(v))
            return jax.lax.fori_loop(0, k, body, w)

        return fn

    def jaxopt_loop(k):
        def fn(w, lam, train):
            _, vjp = jax.vjp(lambda w: jax.grad(inner_loss)(w, lam, train), w)
            body = lambda _, v: (lambda u: u / jnp.max(jnp.abs(u)))(vjp(v)[0])
            return jax.lax.fori_loop(0, k, body, w)

        return fn

    kwargs = dict(count=count, repeats=7, min_run_s=0.02)
    return {
        "bilevax": marginal_time(lineax_loop, w, lam, train, **kwargs),
        "jaxopt": marginal_time(jaxopt_loop, w, lam, train, **kwargs),
    }


# -- the benchmark -------------------------------------------------------------------------------


def _efficiency(timing, hvps: int, hvp_s: float) -> float:
    """Fastest run / (HVP count × one HVP): 1 means the HVPs are all the cost."""
    return min(timing.runs) / (hvps * hvp_s) if hvp_s > 0 else math.nan


def run_case(name, train, val, lam, per_feature, *, tol, repeats, log):
    d = train[0].shape[1]
    label = f"{name}/{'per-feature' if per_feature else 'scalar'} λ"
    start = time.perf_counter()
    w, grad_norm = newton_cg(jnp.zeros(d), lam, train)
    w = jax.block_until_ready(w)
    log(
        f"[{label}] w* by Newton-CG in {time.perf_counter() - start:.1f}s, "
        f"‖∇L(w*)‖ = {float(grad_norm):.1e}"
    )

    reference = None
    if d <= DENSE_MAX_D:
        reference = jax.jit(dense_reference)(w, lam, train, val)[1]

    jaxopt_tol = {"tol": tol}
    iters = jaxopt_hvps(jaxopt_tol, w, lam, train, val) - 1  # less the initial residual
    settings = {
        "iters": (
            lx.CG(rtol=0.0, atol=0.0, max_steps=iters),
            {"tol": 0.0, "maxiter": iters},
            bx.CG(rtol=0.0, atol=0.0, max_steps=iters),
        ),
        "tol": (lx.CG(rtol=tol, atol=tol), jaxopt_tol, bx.CG(rtol=tol, atol=tol)),
    }
    hvp = hvp_times(w, lam, train, count=10 if d > 10_000 else 50)
    rows = []
    for setting, (cg, cg_kwargs, lean_cg) in settings.items():
        outs, times = compare(
            {
                "bilevax": bilevax_hypergrad(cg),
                "jaxopt": jaxopt_hypergrad(cg_kwargs),
                "bilevax_cg": bilevax_hypergrad(lean_cg),
            },
            w,
            lam,
            train,
            val,
            repeats=repeats,
        )
        (out_b, time_b), (out_j, time_j) = [(outs[k], times[k]) for k in ("bilevax", "jaxopt")]
        out_c, time_c = outs["bilevax_cg"], times["bilevax_cg"]
        steps_c = lineax_steps(lean_cg, w, lam, train, val)  # bx.CG: one HVP per step
        agree_c = relerr(out_c[1], out_j[1])
        steps_b = lineax_steps(cg, w, lam, train, val)
        hvps_b = lineax_hvps(steps_b)
        hvps_j = jaxopt_hvps(cg_kwargs, w, lam, train, val)
        agree = relerr(out_b[1], out_j[1])
        err_b = relerr(out_b[1], reference) if reference is not None else math.nan
        err_j = relerr(out_j[1], reference) if reference is not None else math.nan
        # The same Krylov iterate on both sides must agree to rounding; with each library's own
        # stopping rule, to the tolerance.
        bound = 1e-6 if setting == "iters" else max(1e3 * tol, 1e-6)
        if not (agree <= bound and abs(float(out_b[0]) - float(out_j[0])) <= 1e-12):
            raise AssertionError(f"[{label}, {setting}] bilevax and jaxopt disagree: {agree:.1e}")
        if not agree_c <= bound:
            raise AssertionError(f"[{label}, {setting}] bx.CG and jaxopt disagree: {agree_c:.1e}")
        if reference is not None and setting == "iters" and not max(err_b, err_j) <= 1e-5:
            raise AssertionError(
                f"[{label}] hypergradient off the dense reference: {err_b:.1e}, {err_j:.1e}"
            )
        row = {
            "problem": name,
            "lambda": "per-feature" if per_feature else "scalar",
            "d": d,
            "n_train": int(train[0].shape[0]),
            "setting": setting,
            "tol": tol,
            "cg_steps_bx": steps_b,
            "hvps_bx": hvps_b,
            "hvps_jo": hvps_j,
            "run_bx_s": time_b.run_s,
            "run_jo_s": time_j.run_s,
            "ratio": paired_ratio(time_b, time_j),
            "ratio_min": min(time_b.runs) / min(time_j.runs),
            "compile_bx_s": time_b.compile_s,
            "compile_jo_s": time_j.compile_s,
            "hvp_bx_s": hvp["bilevax"],
            "hvp_jo_s": hvp["jaxopt"],
            # Fastest runs on both sides of these: the least disturbed by other load.
            "hvp_eff_bx": _efficiency(time_b, hvps_b, hvp["bilevax"]),
            "hvp_eff_jo": _efficiency(time_j, hvps_j, hvp["jaxopt"]),
            # bilevax with its lean CG (`bx.CG`): one HVP per iteration, 2-norm stopping rule.
            "hvps_bxcg": steps_c,
            "run_bxcg_s": time_c.run_s,
            "ratio_cg": paired_ratio(time_c, time_j),
            "compile_bxcg_s": time_c.compile_s,
            "hvp_eff_bxcg": _efficiency(time_c, steps_c, hvp["bilevax"]),
            "bxcg_vs_jo": agree_c,
            "timing_bxcg": time_c.to_dict(),
            "bx_vs_jo": agree,
            "err_bx": err_b,
            "err_jo": err_j,
            "grad_norm_w_star": float(grad_norm),
            "timing_bx": time_b.to_dict(),
            "timing_jo": time_j.to_dict(),
        }
        rows.append(row)
        log(
            f"[{label}, {setting}] bilevax {time_b.run_s * 1e3:.3g} ms, jaxopt "
            f"{time_j.run_s * 1e3:.3g} ms, ratio {row['ratio']:.2f}, HVPs {hvps_b}/{hvps_j}; "
            f"bx.CG {time_c.run_s * 1e3:.3g} ms, ratio {row['ratio_cg']:.2f}, HVPs {steps_c}"
        )
    return rows


COLUMNS = [
    "problem",
    "lambda",
    "d",
    "setting",
    "hvps_bx",
    "hvps_jo",
    "run_bx_s",
    "run_jo_s",
    "ratio",
    "ratio_min",
    "hvps_bxcg",
    "run_bxcg_s",
    "ratio_cg",
    "hvp_eff_bxcg",
    "compile_bx_s",
    "compile_jo_s",
    "hvp_bx_s",
    "hvp_eff_bx",
    "hvp_eff_jo",
    "bx_vs_jo",
    "err_bx",
    "err_jo",
]


def main(argv=None) -> list[dict]:
    args = parser(
        NAME, "bilevax vs jaxopt: implicit hypergradients of logistic-regression L2 HO"
    ).parse_args(argv)
    out = outputs(args, NAME)
    log = lambda message: print(message, flush=True)
    tol = 1e-8
    repeats = 9 if args.quick else 11
    rows = []
    for name, train, val, lam, per_feature in make_cases(args.quick):
        d = train[0].shape[1]
        rows += run_case(
            name,
            train,
            val,
            lam,
            per_feature,
            tol=tol,
            repeats=3 if d > 10_000 else repeats,
            log=log,
        )

    print()
    print(format_table(rows, COLUMNS))
    print(
        f"\nratio = bilevax (lx.CG) / jaxopt run time, ratio_cg = bilevax (bx.CG) / jaxopt "
        f"(goal ≤ {RATIO_GOAL}); hvp_eff = fastest run / "
        f"(HVPs × one HVP) (goal ≤ {HVP_GOAL}); 'iters': both run the same CG iterations, "
        f"'tol': each library's own stopping rule with tol = {tol:g}."
    )
    payload = {"ratio_goal": RATIO_GOAL, "hvp_goal": HVP_GOAL, "rows": rows}
    labels = [f"{r['problem']}\n{r['lambda']}, {r['setting']}" for r in rows]
    figure = lambda path: bar_ratio_plot(
        path,
        labels,
        {
            "bilevax (lx.CG)": [r["run_bx_s"] for r in rows],
            "bilevax (bx.CG)": [r["run_bxcg_s"] for r in rows],
            "jaxopt": [r["run_jo_s"] for r in rows],
        },
        [r["ratio_cg"] for r in rows],
        ratio_name="bilevax (bx.CG) / jaxopt",
        goal=RATIO_GOAL,
        title="implicit hypergradient, logistic-regression L2 HO (float64, CG)",
    )
    finish(args, NAME, out, payload, figure)
    return rows


if __name__ == "__main__":
    _cli.cli(main)
