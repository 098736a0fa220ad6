r"""Trustworthy hypergradients: the figures of docs/trustworthy-hypergradients.md.

Five measurements on the test zoo (`tests/helpers.py`: ridge with a closed-form
hypergradient, logistic regression, an ill-conditioned quadratic, a tiny MLP):

1. `error_estimate`: the error estimate and bound of `implicit_hypergrad(..., has_aux=True)`
   against the true error (closed form), as the inner and linear-solve tolerances vary.
2. `adaptive_tolerance`: HOAG's tightening tolerances against a fixed tight tolerance: total
   inner steps and CG iterations, and the hyperparameters reached.
3. `warm_start`: CG iterations and inner steps with and without warm starts.
4. `preconditioning`: CG iterations with and without a Jacobi (Hutchinson) preconditioner on
   a badly scaled ridge problem.
5. `precision`: the hypergradient's relative error with the inner loop in
   bfloat16/float16/float32/float64 and the hypergradient in float32/float64.

Everything is counted (steps, iterations, errors), nothing timed, so the numbers are the same
on any machine for a given seed (`--seed` shifts the data of the ridge and logistic problems).

    python -m experiments.hypergrad_diagnostics [--quick] [--out DIR] [--seed S] [--resume]
"""

import dataclasses
import importlib.util
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax

import bilevax as bx

from . import _common


def _zoo():
    """The test zoo, loaded from `tests/helpers.py` (the problems the tests assert on)."""
    path = _common.REPO_ROOT / "tests" / "helpers.py"
    spec = importlib.util.spec_from_file_location("_bilevax_test_zoo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
        return zoo.implicit(
            problem,
            sol.params,
            linear_solver=lx.CG(rtol=linear_tol, atol=linear_tol),
            has_aux=True,
        )

    big = zoo.ridge(n=150, d=40, seed=seed)
    big_exact = big.exact_hypergrad(big.hparams)

    @jax.jit
    def run_linear(linear_tol):
        w_star = big.exact_params(big.hparams)
        return zoo.implicit(
            big, w_star, linear_solver=lx.CG(rtol=linear_tol, atol=linear_tol), has_aux=True
        )

    rows = []
    tols = [1e-2, 1e-6, 1e-10] if quick else [1e-2, 1e-4, 1e-6, 1e-8, 1e-10]
    for tol in tols:
        _, hgrad, info = run(tol, 1e-13)
        rows.append(_error_row("inner", tol, hgrad, exact, info))
    for linear_tol in [1e-2, 1e-4, 1e-6] if quick else [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]:
        _, hgrad, info = run_linear(linear_tol)
        rows.append(_error_row("linear", linear_tol, hgrad, big_exact, info))
    return {"rows": rows}


def _error_row(varied, tol, hgrad, exact, info) -> dict:
    error = float(jnp.linalg.norm(hgrad - exact))
    return dict(
        varied=varied,
        tol=tol,
        true_error=error,
        estimate=float(info.error_estimate),
        bound=float(info.error_bound),
        estimate_over_error=float(info.error_estimate) / error,
        bound_over_error=float(info.error_bound) / error,
        inner_grad_norm=float(info.inner_grad_norm),
        residual_norm=float(info.residual_norm),
        solve_steps=int(info.solve_steps),
        hessian_min=float(info.hessian_min),
        hessian_max=float(info.hessian_max),
    )


def _run_hoag(problem, hoag, num_steps):
    @eqx.filter_jit
    def run(state):
        def body(state, _):
            return hoag.step(
                problem.outer,
                problem.inner,
                state,
                problem.init,
                problem.inner_data,
                problem.outer_data,
            )

        return jax.lax.scan(body, state, length=num_steps)

    state, stats = run(hoag.init(problem.init, problem.hparams))
    return dict(
        hparams=np.asarray(state.hparams),
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
            "adaptive": bx.HOAG(optimizer, solver, initial_tol=1e-2, decay=0.9, **common),
            "fixed": bx.HOAG(optimizer, solver, initial_tol=1e-10, decay=1.0, **common),
        }
        result = {label: _run_hoag(problem, hoag, num_steps) for label, hoag in runs.items()}
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
        optimizer=optax.sgd(1.0),
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
        run = _run_hoag(problem, bx.HOAG(**kwargs, **extra), 60)
        run.pop("cumulative_inner_steps")
        out[name] = run
    return out


def preconditioning(zoo, seed: int, quick: bool) -> dict:
    """Plain against Jacobi-preconditioned CG on ridge with features over three decades."""
    inner, outer, w_star, lam, train, val, exact, A = zoo.scaled_ridge(seed=seed)
    out = {"condition_number": float(np.linalg.cond(np.asarray(A)))}
    for name, preconditioner in [
        ("none", None),
        ("jacobi_16", bx.JacobiPreconditioner(16)),
        ("jacobi_64", bx.JacobiPreconditioner(64)),
        ("jacobi_exact_diagonal", _exact_jacobi(A)),
    ]:
        _, hgrad, info = jax.jit(
            lambda: bx.implicit_hypergrad(
                outer,
                inner,
                w_star,
                lam,
                train,
                val,
                linear_solver=lx.CG(rtol=1e-12, atol=1e-12, max_steps=3000),
                preconditioner=preconditioner,
                has_aux=True,
                lanczos_steps=0,
                estimate_error=False,
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
                solve_tol = 1e-10 if solve == "float64" else 1e-6
                _, hgrad, sol, info = eqx.filter_jit(
                    lambda: bx.mixed_precision_hypergrad(
                        problem.outer,
                        problem.inner,
                        problem.init,
                        problem.hparams,
                        problem.inner_data,
                        problem.outer_data,
                        policy=bx.PrecisionPolicy(DTYPES[inner], DTYPES[solve]),
                        solver=bx.GradientDescent(problem.learning_rate, 0.9),
                        max_steps=5000,
                        tol=1e-10,
                        linear_solver=lx.CG(rtol=solve_tol, atol=solve_tol),
                        has_aux=True,
                    )
                )()
                if reference is None:  # the MLP: its all-float64 run is the reference
                    reference = hgrad
                norm = float(jnp.linalg.norm(jnp.ravel(jnp.asarray(reference, jnp.float64))))
                rows.append(
                    dict(
                        problem=problem.name,
                        inner=inner,
                        solve=solve,
                        relerr=zoo.relerr(hgrad, reference),
                        estimate=float(info.error_estimate) / norm,
                        inner_grad_norm=float(sol.stats["grad_norm"]),
                        inner_steps=int(sol.stats["num_steps"]),
                        result=_result_name(info.result),
                    )
                )
    return {"rows": rows}


def _result_name(result) -> str:
    for name in ("successful", "linear_solve_failed", "not_positive_definite", "nonfinite"):
        if bool(result == getattr(bx.HypergradResult, name)):
            return name
    return "unknown"


SECTIONS = {
    "error_estimate": error_estimate,
    "adaptive_tolerance": adaptive_tolerance,
    "warm_start": warm_start,
    "preconditioning": preconditioning,
    "precision": precision,
}


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = _common.parser("hypergrad_diagnostics", __doc__.splitlines()[0])
    args = p.parse_args(argv)
    out = _common.setup(args)
    ckpt = _common.Checkpoints(out, args.resume)
    zoo = _zoo()
    results = {}
    done = sum(ckpt.load(name) is not None for name in SECTIONS)
    with _common.progress("diagnostics", len(SECTIONS), done) as advance:
        for name, section in SECTIONS.items():
            # A finished section is stored whole, so that a resumed run skips it.
            result = ckpt.load(name)
            if result is None:
                result = section(zoo, args.seed, args.quick)
                ckpt.save(name, result)
                advance(name)
            results[name] = result
    results["config"] = dict(quick=args.quick, seed=args.seed)
    path = _common.write_results(out, results)
    plot(results, out / "hypergrad_diagnostics.png")
    _common.console.print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()
