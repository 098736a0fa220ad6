"""The precision policy: the inner loop in bfloat16/float16/float32, the hypergradient in
float32/float64. The accuracy cost is bounded per inner dtype, and the float64 error estimate
measures it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import ALL, CONVEX, reference_hypergrad, relerr, ridge

import bilevax as bx


# Relative hypergradient error allowed for each inner dtype (measured on the zoo, see
# docs/trustworthy-hypergradients.md: about 1e-7, 4e-4 and 3e-3 on ridge, up to 1e-5, 8e-3
# and 9e-2 over the zoo, the largest on the quadratic with condition number 1e3).
BOUNDS = {"float64": 1e-8, "float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-1}
DTYPES = {
    "float64": jnp.float64,
    "float32": jnp.float32,
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
}


def _linear_solver(solve_dtype):
    """CG to 1e-10 in float64 and 1e-6 in float32. In float32 the test is `bx.CG`'s, on the
    2-norm of the residual relative to the right-hand side: `lx.CG`'s per-component test on
    its periodically recomputed residual stalls near 1e-5 on the MLP's Hessian (condition
    number 4e3) in float32, and a solve that does not reach its tolerance now raises."""
    if solve_dtype == jnp.float64:
        return lx.CG(rtol=1e-10, atol=1e-10)
    return bx.CG(rtol=1e-6, atol=0.0)


def _hypergrad(problem, inner_dtype, solve_dtype, has_aux=True):
    """`mixed_precision_hypergrad`; with `has_aux`, the info is that of
    `bx.diagnostics.hypergrad_info` (Lanczos and the error estimate) in `solve_dtype`, at the
    low-precision solution, from the info of the hypergradient's own solve."""
    policy = bx.contrib.PrecisionPolicy(inner_dtype, solve_dtype)

    @eqx.filter_jit
    def run():
        out = bx.contrib.mixed_precision_hypergrad(
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
            linear_solver=_linear_solver(solve_dtype),
            has_aux=has_aux,
        )
        if not has_aux:
            return out
        value, hgrad, sol, aux = out
        info = bx.diagnostics.hypergrad_info(
            problem.outer,
            problem.inner,
            policy.solve(sol.params),
            policy.solve(problem.hparams),
            policy.solve(problem.inner_data),
            policy.solve(problem.outer_data),
            aux,
        )
        return value, hgrad, sol, info

    return run()


@pytest.mark.slow
@pytest.mark.parametrize("inner", ["float32", "bfloat16"])
def test_ridge_low_precision_inner_loop(inner):
    problem = ridge()
    exact = problem.exact_hypergrad(problem.hparams)
    value, hgrad, sol, info = _hypergrad(problem, DTYPES[inner], jnp.float64)
    assert sol.params.dtype == DTYPES[inner]
    assert hgrad.dtype == jnp.float64 and value.dtype == jnp.float64
    error = relerr(hgrad, exact)
    assert error < BOUNDS[inner]
    # The float64 error estimate at the low-precision solution measures the cost: within 10%.
    estimate = float(info.error_estimate) / float(jnp.linalg.norm(exact))
    assert estimate == pytest.approx(error, rel=0.1)


def test_float32_solve_float16_inner():
    problem = ridge()
    _, hgrad, _ = _hypergrad(problem, jnp.float16, jnp.float32, has_aux=False)
    assert hgrad.dtype == jnp.float32
    assert relerr(hgrad, problem.exact_hypergrad(problem.hparams)) < BOUNDS["float16"]


def test_policy_arguments():
    with pytest.raises(TypeError, match="inner_dtype"):
        bx.contrib.PrecisionPolicy(jnp.int32, jnp.float64)
    with pytest.raises(TypeError, match="solve_dtype"):
        bx.contrib.PrecisionPolicy(jnp.float32, "nonsense")
    policy = bx.contrib.PrecisionPolicy(jnp.bfloat16, jnp.float64)
    tree = {"a": jnp.ones(2), "n": jnp.arange(2), "s": "x"}
    cast = policy.inner(tree)
    assert cast["a"].dtype == jnp.bfloat16 and cast["n"].dtype == tree["n"].dtype
    assert cast["s"] == "x"


@pytest.mark.slow
@pytest.mark.parametrize("make_problem", ALL, ids=lambda f: f.__name__)
@pytest.mark.parametrize("inner", list(DTYPES))
@pytest.mark.parametrize("solve", ["float64", "float32"])
def test_precision_table_on_the_zoo(make_problem, inner, solve):
    problem = make_problem()
    if problem.name == "mlp" and inner == "bfloat16" and solve == "float32":
        # The bfloat16 solution is not a strict minimiser (a Ritz value of -3.6e-3): `bx.CG`
        # meets the negative curvature and the solve breaks down, raised rather than returned.
        with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match="broke"):
            jax.block_until_ready(_hypergrad(problem, DTYPES[inner], DTYPES[solve]))
        return
    _, hgrad, _, info = _hypergrad(problem, DTYPES[inner], DTYPES[solve])
    if make_problem in CONVEX:
        reference = reference_hypergrad(problem)
    else:  # the MLP: the same computation entirely in float64
        _, reference, _, _ = _hypergrad(problem, jnp.float64, jnp.float64)
    error = relerr(hgrad, reference)
    # A float32 solve adds its own ~1e-5 on the ill-conditioned quadratic.
    bound = max(BOUNDS[inner], 1e-4 if solve == "float32" else 0.0)
    if problem.name == "mlp" and inner == "bfloat16":
        # Measured 6e-2; the bfloat16 solution is not a strict minimiser and is reported so
        # (a non-positive curvature outranks the gradient norm above `tol`).
        assert float(info.hessian_min) < 0
        assert info.result == bx.RESULTS.not_positive_definite
        bound = 0.2
    assert error < bound
    assert np.isfinite(error)
