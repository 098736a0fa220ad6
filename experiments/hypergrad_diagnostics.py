r"""Trustworthy hypergradients: the figures of docs/trustworthy-hypergradients.md.

Five measurements on the problem zoo of `experiments/problems.py` (ridge with a closed-form
hypergradient, logistic regression, an ill-conditioned quadratic, a tiny MLP; the tests hold
the same problems in `tests/helpers.py`):

1. `error_estimate`: the error estimate and bound of `bx.diagnostics.hypergrad_info`, at the
   adjoint that `implicit_hypergrad(..., has_aux=True)` returns, against the true error
   (closed form), as the inner and linear-solve tolerances vary.
2. `adaptive_tolerance`: HOAG's (`bx.contrib.HOAG`) tightening tolerances against a fixed
   tight tolerance: total inner steps and CG iterations, and the hyperparameters reached.
3. `warm_start`: CG iterations and inner steps with and without warm starts.
4. `preconditioning`: CG iterations with and without a Jacobi (Hutchinson) preconditioner
   (`bx.Preconditioned(lx.CG(...), bx.JacobiPreconditioner(S))`) on a badly scaled ridge
   problem.
5. `precision`: the hypergradient's relative error with the inner loop in
   bfloat16/float16/float32/float64 and the hypergradient in float32/float64.

Everything is counted (steps, iterations, errors), nothing timed, so the numbers are the same
on any machine for a given seed (`--seed` shifts the data of the ridge and logistic problems).

Each measurement is checkpointed when it is done, so `--resume` runs only those left.

    python -m experiments.hypergrad_diagnostics [--quick] [--out DIR] [--seed S]
        [--resume | --overwrite]
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax

import bilevax as bx

from . import _cli, _console, _harness, _outputs, problems


def _diagnosed(zoo, problem, params, *, tol=1e-6, **kwargs):
    """`(hypergrad, info, diagnostics)`: the implicit hypergradient at `params` with its info,
    and `bx.diagnostics.hypergrad_info` (Lanczos, the error estimate and bound) from it."""
    _, hgrad, info = zoo.implicit(problem, params, has_aux=True, tol=tol, **kwargs)
    return hgrad, info, zoo.diagnose(problem, params, info)


def error_estimate(zoo, seed: int, quick: bool) -> dict:
    """The estimate and bound against the closed-form error on ridge."""
    problem = zoo.ridge(seed=seed)
    exact = problem.exact_hypergrad(problem.hparams)

    @jax.jit
    def run(tol, linear_tol):
        sol = bx.inner_solve(
            problem.inner,
            problem.init,
            problem.hparams,
            problem.inner_data,
            solver=bx.GradientDescent(problem.learning_rate),
            max_steps=100_000,
            tol=tol,
        )
        return _diagnosed(
            zoo, problem, sol.params, tol=tol, linear_solver=lx.CG(rtol=linear_tol, atol=linear_tol)
        )

    big = zoo.ridge(n=150, d=40, seed=seed)
    big_exact = big.exact_hypergrad(big.hparams)

    @jax.jit
    def run_linear(linear_tol):
        w_star = big.exact_params(big.hparams)
        return _diagnosed(zoo, big, w_star, linear_solver=lx.CG(rtol=linear_tol, atol=linear_tol))

    rows = []
    tols = [1e-2, 1e-6, 1e-10] if quick else [1e-2, 1e-4, 1e-6, 1e-8, 1e-10]
    for tol in tols:
        rows.append(_error_row("inner", tol, exact, *run(tol, 1e-13)))
    for linear_tol in [1e-2, 1e-4, 1e-6] if quick else [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]:
        rows.append(_error_row("linear", linear_tol, big_exact, *run_linear(linear_tol)))
    return {"rows": rows}


def _error_row(varied, tol, exact, hgrad, info, diagnostics) -> dict:
    error = float(jnp.linalg.norm(hgrad - exact))
    return dict(
        varied=varied,
        tol=tol,
        true_error=error,
        estimate=float(diagnostics.error_estimate),
        bound=float(diagnostics.error_bound),
        estimate_over_error=float(diagnostics.error_estimate) / error,
        bound_over_error=float(diagnostics.error_bound) / error,
        inner_grad_norm=float(info.inner_grad_norm),
        residual_norm=float(info.residual_norm),
        solve_steps=int(info.solve_steps),
        hessian_min=float(diagnostics.hessian_min),
        hessian_max=float(diagnostics.hessian_max),
        result=_result_name(diagnostics.result),
    )


def _run_hoag(problem, hoag, optimizer, num_steps):
    """`num_steps` steps of `optimizer` on HOAG's hypergradients."""

    @eqx.filter_jit
    def run(state):
        def body(carry, _):
            hparams, state, opt_state = carry
            value, hypergrad, state, stats = hoag.value_and_grad(
                problem.outer,
                problem.inner,
                hparams,
                state,
                problem.inner_data,
                problem.outer_data,
            )
            # Adam's bias correction mixes an int32 count with floats.
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = optimizer.update(hypergrad, opt_state, hparams)
            hparams = optax.apply_updates(hparams, updates)
            return (hparams, state, opt_state), dict(stats, value=value, hypergrad=hypergrad)

        carry = (problem.hparams, state, optimizer.init(problem.hparams))
        (hparams, _, _), stats = jax.lax.scan(body, carry, length=num_steps)
        return hparams, stats

    hparams, stats = run(hoag.init(problem.init, problem.hparams))
    return dict(
        hparams=np.asarray(hparams),
        inner_steps=int(jnp.sum(stats["inner_steps"])),
        solve_steps=int(jnp.sum(stats["solve_steps"])),
        cumulative_inner_steps=np.cumsum(np.asarray(stats["inner_steps"])),
        final_value=float(stats["value"][-1]),
        final_hypergrad_norm=float(jnp.linalg.norm(jnp.ravel(stats["hypergrad"][-1]))),
    )


def adaptive_tolerance(zoo, seed: int, quick: bool) -> dict:
    """HOAG (ε_k = 1e-2·0.9^k down to 1e-10) against a fixed ε = 1e-10, same outer optimiser."""
    problems = {
        "ridge": dataclasses.replace(zoo.ridge(n=30, seed=seed), hparams=jnp.asarray(0.0)),
        "logistic": zoo.logistic(n=40, seed=seed + 1),
    }
    num_steps = 300
    out = {}
    for name, problem in problems.items():
        optimizer = optax.adam(optax.exponential_decay(0.1, 100, 0.3))
        solver = bx.GradientDescent(problem.learning_rate, 0.5)
        common = dict(final_tol=1e-10, max_steps=100_000)
        runs = {
            "adaptive": bx.contrib.HOAG(solver, initial_tol=1e-2, decay=0.9, **common),
            "fixed": bx.contrib.HOAG(solver, initial_tol=1e-10, decay=1.0, **common),
        }
        result = {
            label: _run_hoag(problem, hoag, optimizer, num_steps) for label, hoag in runs.items()
        }
        result["hparams_difference"] = float(
            np.max(np.abs(result["adaptive"]["hparams"] - result["fixed"]["hparams"]))
        )
        result["inner_steps_saved"] = 1 - result["adaptive"]["inner_steps"] / max(
            result["fixed"]["inner_steps"], 1
        )
        result["outer_steps"] = num_steps
        out[name] = result
    return out


def warm_start(zoo, seed: int, quick: bool) -> dict:
    """Fixed tolerance 1e-10, 60 outer SGD steps on a 40-feature ridge problem."""
    problem = zoo.ridge(n=150, d=40, seed=seed)
    kwargs = dict(
        solver=bx.GradientDescent(problem.learning_rate, 0.5),
        initial_tol=1e-10,
        decay=1.0,
        final_tol=1e-10,
        max_steps=100_000,
    )
    variants = {
        "warm_both": {},
        "cold_adjoint": dict(warm_start_adjoint=False),
        "cold_params": dict(warm_start_params=False),
        "cold_both": dict(warm_start_params=False, warm_start_adjoint=False),
    }
    out = {}
    for name, extra in variants.items():
        run = _run_hoag(problem, bx.contrib.HOAG(**kwargs, **extra), optax.sgd(1.0), 60)
        run.pop("cumulative_inner_steps")
        out[name] = run
    return out


def preconditioning(zoo, seed: int, quick: bool) -> dict:
    """Plain against Jacobi-preconditioned CG on ridge with features over three decades."""
    inner, outer, w_star, lam, train, val, exact, A = zoo.scaled_ridge(seed=seed)
    out = {"condition_number": float(np.linalg.cond(np.asarray(A)))}
    cg = lx.CG(rtol=1e-12, atol=1e-12, max_steps=3000)
    for name, linear_solver in [
        ("none", cg),
        ("jacobi_16", bx.Preconditioned(cg, bx.JacobiPreconditioner(16))),
        ("jacobi_64", bx.Preconditioned(cg, bx.JacobiPreconditioner(64))),
        ("jacobi_exact_diagonal", bx.Preconditioned(cg, _exact_jacobi(A))),
    ]:
        _, hgrad, info = jax.jit(
            lambda: bx.implicit_hypergrad(
                outer, inner, w_star, lam, train, val, linear_solver=linear_solver, has_aux=True
            )
        )()
        out[name] = dict(solve_steps=int(info.solve_steps), relerr=zoo.relerr(hgrad, exact))
    return out


def _exact_jacobi(A):
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag, lx.diagonal_tag)
    return lx.TaggedLinearOperator(lx.DiagonalLinearOperator(1 / jnp.diag(A)), tags)


DTYPES = {
    "float64": jnp.float64,
    "float32": jnp.float32,
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
}


def precision(zoo, seed: int, quick: bool) -> dict:
    """Relative hypergradient error per (problem, inner dtype, solve dtype)."""
    del seed
    rows = []
    solve_dtypes = ["float64"] if quick else ["float64", "float32"]
    for make in zoo.ALL:
        problem = make()
        reference = None if make is zoo.mlp else zoo.reference_hypergrad(problem)
        for solve in solve_dtypes:
            for inner in DTYPES:
                row = dict(problem=problem.name, inner=inner, solve=solve)
                try:
                    hgrad, sol, info = _mixed_precision(problem, DTYPES[inner], DTYPES[solve])
                except (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError) as error:
                    # The failure policy: a linear solve that failed raises (the bfloat16
                    # MLP's Hessian is indefinite, and `bx.CG` breaks down on it in float32).
                    rows.append(row | dict(relerr=None, estimate=None, result=_raised(error)))
                    continue
                if reference is None:  # the MLP: its all-float64 run is the reference
                    reference = hgrad
                norm = float(jnp.linalg.norm(jnp.ravel(jnp.asarray(reference, jnp.float64))))
                row |= dict(
                    relerr=zoo.relerr(hgrad, reference),
                    # None where the estimate is NaN (its own solves broke down).
                    estimate=_finite_or_none(float(info.error_estimate) / norm),
                    inner_grad_norm=float(sol.stats["grad_norm"]),
                    inner_steps=int(sol.stats["num_steps"]),
                    result=_result_name(info.result),
                )
                rows.append(row)
    return {"rows": rows}


def _finite_or_none(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _raised(error: Exception) -> str:
    """Which failure of the linear solve an error reports."""
    message = str(error)
    for phrase, name in [
        ("broke down", "breakdown"),
        ("non-finite", "nonfinite"),
        ("did not reach", "max_steps_reached"),
        ("singular", "singular"),
    ]:
        if phrase in message:
            return f"raised: {name}"
    return "raised"


def _mixed_precision(problem, inner_dtype, solve_dtype):
    """`(hypergrad, solution, info)`: `bx.contrib.mixed_precision_hypergrad` with the inner
    loop in `inner_dtype` (stationary means the inner solve's `tol`, 1e-10), and
    `bx.diagnostics.hypergrad_info` in `solve_dtype` from its info.

    CG runs to 1e-10 in float64 and 1e-6 in float32; in float32 on `bx.CG`'s test (the 2-norm
    of the residual relative to the right-hand side), which float32 can meet: `lx.CG`'s
    per-component test on its periodically recomputed residual stalls near 1e-5 on the MLP,
    and a linear solve that does not reach its tolerance raises."""
    if solve_dtype == jnp.float64:
        linear_solver = lx.CG(rtol=1e-10, atol=1e-10)
    else:
        linear_solver = bx.CG(rtol=1e-6, atol=0.0)
    policy = bx.contrib.PrecisionPolicy(inner_dtype, solve_dtype)

    @eqx.filter_jit
    def run():
        _, hgrad, sol, aux = bx.contrib.mixed_precision_hypergrad(
            problem.outer,
            problem.inner,
            problem.init,
            problem.hparams,
            problem.inner_data,
            problem.outer_data,
            policy=policy,
            solver=bx.GradientDescent(problem.learning_rate, 0.9),
            max_steps=5000,
            tol=1e-10,
            linear_solver=linear_solver,
            has_aux=True,
        )
        info = bx.diagnostics.hypergrad_info(
            problem.outer,
            problem.inner,
            policy.solve(sol.params),
            policy.solve(problem.hparams),
            policy.solve(problem.inner_data),
            policy.solve(problem.outer_data),
            aux,
        )
        return hgrad, sol, info

    return run()


RESULT_NAMES = (
    "successful",
    "max_steps_reached",
    "breakdown",
    "singular",
    "stagnation",
    "conlim",
    "nonfinite_input",
    "nonfinite",
    "not_stationary",
    "not_positive_definite",
)


def _result_name(result) -> str:
    for name in RESULT_NAMES:
        if bool(result == getattr(bx.RESULTS, name)):
            return name
    return "unknown"


SECTIONS = {
    "error_estimate": error_estimate,
    "adaptive_tolerance": adaptive_tolerance,
    "warm_start": warm_start,
    "preconditioning": preconditioning,
    "precision": precision,
}


def plot(results: dict, path):
    plt = _outputs.pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = [r for r in results["error_estimate"]["rows"] if r["varied"] == "inner"]
    tols = [r["tol"] for r in rows]
    left.loglog(tols, [r["true_error"] for r in rows], "o-", label="true error")
    left.loglog(tols, [r["estimate"] for r in rows], "x--", label="estimate")
    left.loglog(tols, [r["bound"] for r in rows], "s:", label="bound")
    left.set(xlabel="inner tolerance", ylabel="‖h − h*‖", title="ridge: hypergradient error")
    left.legend()
    for name, style in [("ridge", "-"), ("logistic", "--")]:
        result = results["adaptive_tolerance"][name]
        for label in ("adaptive", "fixed"):
            middle.plot(result[label]["cumulative_inner_steps"], style, label=f"{name} {label}")
    middle.set(xlabel="outer step", ylabel="total inner steps", title="HOAG vs fixed tolerance")
    middle.legend()
    table = results["precision"]["rows"]
    problems = list(dict.fromkeys(r["problem"] for r in table))
    for i, inner in enumerate(DTYPES):
        errs = [
            next(r["relerr"] for r in table if r["problem"] == p and r["inner"] == inner)
            for p in problems
        ]
        right.bar(np.arange(len(problems)) + 0.2 * i, np.maximum(errs, 1e-16), 0.2, label=inner)
    right.set_yscale("log")
    right.set_xticks(np.arange(len(problems)) + 0.3, problems)
    right.set(ylabel="relative error", title="inner dtype (float64 solve)")
    right.legend()
    return _outputs.save_figure(fig, path)


def main(argv=None) -> dict:
    p = _cli.parser("hypergrad_diagnostics", __doc__.splitlines()[0])
    args = p.parse_args(argv)
    run = _harness.start(args)
    results = {}
    with _console.progress("diagnostics", len(SECTIONS)) as advance:
        for name, section in SECTIONS.items():
            # A finished section is stored whole, so that a resumed run skips it.
            results[name] = run.stage(name, lambda: section(problems, args.seed, args.quick))
            advance(name)
    results["config"] = run.config
    return run.finish(results, {"hypergrad_diagnostics.png": lambda path: plot(results, path)})


if __name__ == "__main__":
    _cli.cli(main)
