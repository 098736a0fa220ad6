r"""Approximate adjoints on the problem zoo: the figures of docs/approximate-adjoints.md.

For each zoo problem of `experiments/problems.py` (ridge, logistic regression, an
ill-conditioned quadratic, a tiny MLP), and ridge with a strong penalty (`ridge_e30`, a
well-conditioned Hessian, where one step nearly solves the problem), the inner problem is
solved with Adam, once to $\|\nabla_w L\| \le 10^{-8}$ ("solved") and once to $10^{-3}$
("rough"), and at each point every adjoint computes the hypergradient:

- `exact`: `bx.implicit_hypergrad` (CG to 1e-10), the reference cost;
- `one_step`: `bx.OneStepAdjoint()` through gradient descent with the problem's step $\eta$;
- `darts`: `bx.FiniteDifferenceAdjoint()` (ξ = η, ε = 0.01/‖v‖);
- `betty_darts`: `bx.FiniteDifferenceAdjoint(learning_rate=1.0)`, betty's `darts`;
- `sama`: `bx.SAMAAdjoint` from the Adam solve's state, betty's `sama` (ε = 1/‖v‖).

Each row has the true error $\|h - h^*\|$ (against the closed form, a dense Newton solve, or
for the MLP the exact implicit hypergradient at the same point), the error estimate and bound
of `bx.diagnostics.hypergrad_info(..., hypergrad=h)`, the cost in second-order products
(Hessian- or mixed-vector products) and gradients, and the median wall time of the jitted
hypergradient against the exact adjoint's on the same machine.

    python -m experiments.approximate_adjoints [--quick] [--out DIR] [--seed S]
        [--resume | --overwrite]
"""

import dataclasses
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax

import bilevax as bx

from . import _cli, _console, _harness, _outputs, problems


ADAM = dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8)
METHODS = ("exact", "one_step", "darts", "betty_darts", "sama")
TOLS = {"solved": 1e-8, "rough": 1e-3}


def _step_size(problem) -> float:
    # Gradient descent's safe step: the problems' own, except the MLP's (Adam's).
    return problem.learning_rate if problem.strongly_convex else 0.05


def _adjoints(problem):
    gd = bx.GradientDescent(_step_size(problem))
    adam = optax.adam(**ADAM)
    return {
        "one_step": (bx.OneStepAdjoint(), gd),
        "darts": (bx.FiniteDifferenceAdjoint(), gd),
        "betty_darts": (bx.FiniteDifferenceAdjoint(learning_rate=1.0), gd),
        "sama": (bx.SAMAAdjoint(**ADAM), adam),
    }


def _hypergrad_fn(problem, params, state, method):
    """A jitted `hparams -> (hypergrad, info)` for one method at fixed `params`."""
    common = (problem.outer, problem.inner, params)
    data = (problem.inner_data, problem.outer_data)
    if method == "exact":
        solver = lx.CG(rtol=1e-10, atol=1e-10, max_steps=10_000)

        def run(hparams):
            _, hgrad, info = bx.implicit_hypergrad(
                *common, hparams, *data, linear_solver=solver, has_aux=True, tol=1.0
            )
            return hgrad, info

    else:
        adjoint, solver = _adjoints(problem)[method]

        def run(hparams):
            _, hgrad, info = bx.implicit_hypergrad(
                *common,
                hparams,
                *data,
                adjoint=adjoint,
                solver=solver,
                solver_state=state if method == "sama" else None,
                has_aux=True,
                tol=1.0,
            )
            return hgrad, info

    return eqx.filter_jit(run)


def _wall_time(fn, hparams, repeats: int) -> float:
    """Median seconds of a compiled call (compiled by one call first)."""
    jax.block_until_ready(fn(hparams))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(hparams))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _cost(method: str, info) -> dict:
    """Second-order products and gradients of one hypergradient (the outer gradient, common
    to all, not counted): the exact adjoint's CG products and its mixed product; the
    one-step adjoint's one mixed product (the step's derivative); the finite differences'
    two gradients of the inner loss, and SAMA's third, the gradient at the point."""
    if method == "exact":
        return dict(second_order=int(info.solve_steps) + 1, gradients=0)
    if method == "one_step":
        return dict(second_order=1, gradients=0)
    return dict(second_order=0, gradients=3 if method == "sama" else 2)


def well_conditioned_ridge(zoo, seed: int):
    """Ridge with a strong penalty, e^λ = 30 on every feature: H ≈ 30 I + XᵀX/n, condition
    number about 1.2, and gradient descent at η = 1/λ_max(H) contracts by 1 − 1/κ ≈ 0.2 per
    step: where the one-step estimate is meant to be good."""
    problem = zoo.ridge(seed=seed)
    X = np.asarray(problem.inner_data[0])
    lmax = float(np.linalg.eigvalsh(X.T @ X / X.shape[0])[-1])
    return dataclasses.replace(
        problem,
        name="ridge_e30",
        hparams=jnp.full(X.shape[1], np.log(30.0)),
        learning_rate=1.0 / (lmax + 30.0),
    )


PROBLEMS = ("ridge", "ridge_e30", "logistic", "quadratic", "mlp")


def _problem(zoo, name: str, seed: int):
    if name == "ridge_e30":
        return well_conditioned_ridge(zoo, seed)
    make = getattr(zoo, name)
    return make(seed=seed) if name in ("ridge", "logistic") else make()


def measure(zoo, name: str, seed: int, quick: bool) -> list[dict]:
    problem = _problem(zoo, name, seed)
    rows = []
    for regime, tol in TOLS.items():
        sol = bx.inner_solve(
            problem.inner,
            problem.init,
            problem.hparams,
            problem.inner_data,
            solver=optax.adam(**ADAM),
            max_steps=100_000,
            tol=tol,
        )
        params, state = sol.params, sol.state
        if problem.strongly_convex:
            reference = zoo.reference_hypergrad(problem)
        else:  # the MLP: the exact implicit hypergradient at this point
            reference = _hypergrad_fn(problem, params, state, "exact")(problem.hparams)[0]
        reference_norm = float(jnp.linalg.norm(jnp.ravel(reference)))
        times = {}
        for method in METHODS:
            fn = _hypergrad_fn(problem, params, state, method)
            hgrad, info = fn(problem.hparams)
            times[method] = _wall_time(fn, problem.hparams, 5 if quick else 30)
            diagnostics = problems.diagnose(problem, params, info, hypergrad=hgrad)
            error = float(jnp.linalg.norm(jnp.ravel(hgrad - reference)))
            estimate = float(diagnostics.error_estimate)
            bound = float(diagnostics.error_bound)
            rows.append(
                dict(
                    problem=problem.name,
                    regime=regime,
                    inner_grad_norm=float(sol.stats["grad_norm"]),
                    method=method,
                    relative_error=error / reference_norm,
                    true_error=error,
                    estimate=estimate,
                    bound=bound,
                    estimate_over_error=estimate / max(error, 1e-300),
                    bound_holds=bool(bound >= error),
                    residual_norm=float(info.residual_norm),
                    **_cost(method, info),
                    seconds=times[method],
                    time_over_exact=times[method] / times["exact"],
                )
            )
    return rows


def plot(results: dict, path):
    plt = _outputs.pyplot()
    rows = [r for r in results["rows"] if r["regime"] == "solved" and r["method"] != "exact"]
    names = list(dict.fromkeys(r["problem"] for r in rows))
    methods = [m for m in METHODS if m != "exact"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, method in enumerate(methods):
        mine = [next(r for r in rows if r["problem"] == p and r["method"] == method) for p in names]
        x = np.arange(len(names)) + 0.2 * i
        left.bar(x, [max(r["relative_error"], 1e-16) for r in mine], 0.2, label=method)
        right.scatter([r["true_error"] for r in mine], [r["estimate"] for r in mine], label=method)
    left.set_yscale("log")
    left.set_xticks(np.arange(len(names)) + 0.3, names)
    left.set(ylabel="relative error ‖h − h*‖/‖h*‖", title="at a solution (‖∇L‖ ≤ 1e-8)")
    left.legend()
    right.set(xscale="log", yscale="log", xlabel="true error", ylabel="estimate")
    right.set_title("error estimate against true error")
    right.legend()
    return _outputs.save_figure(fig, path)


def main(argv=None) -> dict:
    p = _cli.parser("approximate_adjoints", __doc__.splitlines()[0])
    args = p.parse_args(argv)
    run = _harness.start(args)
    rows = []
    with _console.progress("problems", len(PROBLEMS)) as advance:
        for name in PROBLEMS:
            # A finished problem is stored whole, so that a resumed run skips it.
            rows += run.stage(name, lambda: measure(problems, name, args.seed, args.quick))
            advance(name)
    results = {"rows": rows, "config": run.config}
    return run.finish(results, {"approximate_adjoints.png": lambda path: plot(results, path)})


if __name__ == "__main__":
    _cli.cli(main)
