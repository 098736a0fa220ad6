"""`bx.CG`, the lean conjugate-gradient solver: the same solutions as `lx.CG` and a dense solve,
the same Krylov iterates as `jax.scipy.sparse.linalg.cg`, honest results, and hypergradients
through `bx.implicit_hypergrad` equal to the dense reference."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import (
    implicit,
    logistic,
    quadratic,
    reference_hypergrad,
    reference_solution,
    relerr,
    ridge,
)

import bilevax as bx


TAGS = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def _spd(d: int, condition: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = (Q * np.geomspace(1.0, condition, d)) @ Q.T
    return jnp.asarray((A + A.T) / 2), jnp.asarray(rng.standard_normal(d))


@pytest.mark.parametrize("condition", [1.0, 1e2, 1e4])
def test_matches_dense_and_lineax(condition):
    A, b = _spd(40, condition)
    operator = lx.MatrixLinearOperator(A, TAGS)
    exact = jnp.linalg.solve(A, b)
    ours = lx.linear_solve(operator, b, bx.CG(rtol=1e-12, atol=1e-12), throw=False)
    theirs = lx.linear_solve(
        operator, b, lx.CG(rtol=1e-12, atol=1e-12, max_steps=10_000), throw=False
    )
    assert ours.result == lx.RESULTS.successful
    bound = 1e-10 * max(1.0, condition)
    assert relerr(ours.value, exact) <= bound
    assert relerr(ours.value, theirs.value) <= bound


@pytest.mark.parametrize("steps", [1, 5, 17])
def test_same_iterates_as_scipy_cg(steps):
    A, b = _spd(30, 1e3, seed=1)
    operator = lx.MatrixLinearOperator(A, TAGS)
    ours = lx.linear_solve(operator, b, bx.CG(0.0, 0.0, max_steps=steps)).value
    scipy, _ = jax.scipy.sparse.linalg.cg(lambda v: A @ v, b, tol=0.0, maxiter=steps)
    assert relerr(ours, scipy) <= 1e-12


def test_reports_non_convergence():
    A, b = _spd(50, 1e6, seed=2)
    operator = lx.MatrixLinearOperator(A, TAGS)
    sol = lx.linear_solve(operator, b, bx.CG(1e-12, 1e-12, max_steps=5), throw=False)
    assert sol.result == lx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 5
    with pytest.raises(Exception, match="maximum number of solver steps"):
        lx.linear_solve(operator, b, bx.CG(1e-12, 1e-12, max_steps=5))


def test_reports_breakdown_on_an_indefinite_operator():
    # Tagged positive semidefinite, but it is not: CG meets a direction of negative
    # curvature and says so instead of returning an answer.
    rng = np.random.default_rng(6)
    Q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    A = jnp.asarray((Q * np.asarray([-2.0, -0.5, 1, 2, 3, 4, 5, 6])) @ Q.T)
    b = jnp.asarray(rng.standard_normal(8))
    operator = lx.MatrixLinearOperator((A + A.T) / 2, TAGS)
    sol = lx.linear_solve(operator, b, bx.CG(1e-12, 1e-12), throw=False)
    assert sol.result == lx.RESULTS.breakdown
    assert int(sol.stats["num_steps"]) < 8
    with pytest.raises(Exception, match="iterative breakdown"):
        lx.linear_solve(operator, b, bx.CG(1e-12, 1e-12))


def test_options_pytrees_and_negative_definite():
    A, b = _spd(12, 50.0, seed=3)
    exact = jnp.linalg.solve(A, b)
    # A pytree operator: a dict of two blocks, applied through a function.
    split = lambda v: {"a": v[:5], "b": v[5:]}
    join = lambda t: jnp.concatenate([t["a"], t["b"]])
    structure = jax.eval_shape(split, b)
    operator = lx.FunctionLinearOperator(lambda t: split(A @ join(t)), structure, TAGS)
    cg = bx.CG(rtol=1e-13, atol=1e-13)
    sol = lx.linear_solve(operator, split(b), cg)
    assert relerr(join(sol.value), exact) <= 1e-10
    # y0 and a Jacobi preconditioner give the same answer.
    jacobi = lx.MatrixLinearOperator(jnp.diag(1 / jnp.diag(A)), TAGS)
    options = {"y0": 0.5 * exact, "preconditioner": jacobi}
    sol = lx.linear_solve(lx.MatrixLinearOperator(A, TAGS), b, cg, options=options)
    assert relerr(sol.value, exact) <= 1e-10
    # A negative definite operator.
    negative = lx.MatrixLinearOperator(-A, (lx.symmetric_tag, lx.negative_semidefinite_tag))
    assert relerr(lx.linear_solve(negative, b, cg).value, -exact) <= 1e-10


def test_under_vmap_and_jit():
    A, _ = _spd(20, 100.0, seed=4)
    bs = jnp.asarray(np.random.default_rng(5).standard_normal((3, 20)))
    solve = lambda b: (
        lx.linear_solve(lx.MatrixLinearOperator(A, TAGS), b, bx.CG(1e-13, 1e-13)).value
    )
    out = jax.jit(jax.vmap(solve))(bs)
    assert relerr(out, jnp.linalg.solve(A, bs.T).T) <= 1e-10


def test_bad_arguments():
    with pytest.raises(ValueError, match="rtol"):
        bx.CG(rtol=-1.0, atol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        bx.CG(0.0, 0.0)
    with pytest.raises(ValueError, match="max_steps"):
        bx.CG(1e-6, 1e-6, max_steps=-3)
    with pytest.raises(ValueError, match="definite"):
        lx.linear_solve(lx.MatrixLinearOperator(jnp.eye(3)), jnp.ones(3), bx.CG(1e-6, 1e-6))


@pytest.mark.parametrize(
    "make, mode",
    [
        pytest.param(ridge, "reverse", marks=pytest.mark.slow),
        pytest.param(logistic, "reverse", marks=pytest.mark.slow),
        (quadratic, "reverse"),
        (ridge, "forward"),
    ],
)
def test_hypergradient_on_the_zoo(make, mode):
    problem = make()
    w_star = reference_solution(problem)
    _, hgrad = implicit(problem, w_star, linear_solver=bx.CG(1e-13, 1e-13), mode=mode)
    reference = reference_hypergrad(problem, params_star=w_star)
    assert relerr(hgrad, reference) <= 1e-9
