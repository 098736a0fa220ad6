"""How good a start is SHINE's `B⁻¹ ∇_w E` for the adjoint, with OPA pairs added during the
inner solve, at its end, or not at all?

SHINE (Ramzi et al., ICLR 2022) takes the inner L-BFGS's inverse-Hessian approximation `B⁻¹`
applied to the outer gradient as the adjoint; OPA adds secant pairs along that direction, the
authors every few inner steps. Here the inner solve runs in chunks of `k` L-BFGS steps (its
state resumed), with one OPA pair (`ho_loop.with_opa_pair`) between chunks, and the table
gives the inner steps it took and the relative residual `‖H s − ∇_w E‖ / ‖∇_w E‖` of SHINE's
start `s` at the solution, without and with one more pair at the end. `k = 2,000` is one
chunk: no pair during the solve. The problems are `ho_loop`'s synthetic logistic regressions
at its starting λ (L-BFGS, history 10, tolerance 1e-8).

    python -m experiments.benchmarks.shine_opa [--quick]   # --quick: the d ≤ 200 problems
"""

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

import bilevax as bx

from .. import _cli
from ..problems import logistic_loss as inner_loss, logistic_outer as outer_loss
from . import ho_loop
from ._timing import finish, format_table, outputs, parser


jax.config.update("jax_enable_x64", True)

NAME = "shine_opa"
# name -> (training points, validation points, features, base L2 strength, seed of the spread)
PROBLEMS = {
    "d200_strength1e-3": (100, 50, 200, 1e-3, 1),
    "d200_strength1e-2": (100, 50, 200, 1e-2, 2),
    "d100_strength1e-3": (200, 100, 100, 1e-3, 1),
    "d2000_strength1e-3": (1_000, 500, 2_000, 1e-3, 1),
}
QUICK_PROBLEMS = ("d200_strength1e-3", "d200_strength1e-2", "d100_strength1e-3")
CHUNKS = (2_000, 20, 10, 5)
TOL = 1e-8


def run(n_train, n_val, d, strength, seed) -> list[dict]:
    (X_train, y_train), (X_val, y_val) = ho_loop.synthetic(n_train, n_val, d)
    train = (jnp.asarray(X_train), jnp.asarray(y_train))
    val = (jnp.asarray(X_val), jnp.asarray(y_val))
    lam = jnp.asarray(np.log(strength) + np.random.default_rng(seed).uniform(-1.0, 1.0, d))
    solver = optx.LBFGS(rtol=TOL, atol=TOL, history_length=ho_loop.HISTORY)
    hvp_at = lambda w: jax.linearize(lambda u: jax.grad(inner_loss)(u, lam, train), w)[1]
    outer_grad = lambda w: jax.grad(outer_loss)(w, lam, val)

    @jax.jit
    def add_pair(w, state):
        return ho_loop.with_opa_pair(solver, state, w, hvp_at(w), outer_grad(w))

    @jax.jit
    def start_residual(w, state):
        g = outer_grad(w)
        start = ho_loop.inverse_hessian_mv(solver, state, w, g)
        return jnp.linalg.norm(hvp_at(w)(start) - g) / jnp.linalg.norm(g)

    rows = []
    for k in CHUNKS:
        chunk = jax.jit(
            lambda w, state: bx.inner_solve(
                inner_loss, w, lam, train, solver=solver, tol=TOL, max_steps=k, solver_state=state
            )
        )
        w = jnp.zeros(d)
        state = bx.inner_solve(inner_loss, w, lam, train, solver=solver, max_steps=0).state
        steps, pairs = 0, 0
        while True:
            sol = chunk(w, state)
            steps += int(sol.stats["num_steps"])
            w, state = sol.params, sol.state
            if sol.result == bx.RESULTS.successful or steps >= ho_loop.INNER_MAX_STEPS:
                break
            state = add_pair(w, state)
            pairs += 1
        rows.append(
            {
                "d": d,
                "strength": strength,
                "chunk": k,
                "inner_steps": steps,
                "opa_pairs": pairs,
                "converged": bool(sol.result == bx.RESULTS.successful),
                "shine_residual": float(start_residual(w, state)),
                "with_end_pair": float(start_residual(w, add_pair(w, state))),
            }
        )
    return rows


def main(argv=None) -> list[dict]:
    cli = parser(NAME, "SHINE's adjoint start with OPA pairs during, or at the end of, the solve")
    args = cli.parse_args(argv)
    out = outputs(args, NAME)
    rows = []
    for name in QUICK_PROBLEMS if args.quick else PROBLEMS:
        rows += run(*PROBLEMS[name])
        print(format_table(rows[-len(CHUNKS) :], list(rows[0])), flush=True)
    finish(args, NAME, out, {"rows": rows})
    return rows


if __name__ == "__main__":
    _cli.cli(main)
