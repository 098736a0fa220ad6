"""Preconditioned and robust implicit solves: Jacobi preconditioning cuts CG iterations on a
badly scaled problem with the same answer; an indefinite or singular Hessian is reported."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import relerr, scaled_ridge

import bilevax as bx


def test_jacobi_preconditioning_cuts_cg_iterations_with_the_same_answer():
    inner, outer, w_star, lam, train, val, exact, A = scaled_ridge()
    assert np.linalg.cond(np.asarray(A)) > 1e6

    def run(preconditioner):
        cg = lx.CG(rtol=1e-12, atol=1e-12, max_steps=3000)
        solver = cg if preconditioner is None else bx.Preconditioned(cg, preconditioner)
        return jax.jit(
            lambda: bx.implicit_hypergrad(
                outer, inner, w_star, lam, train, val, linear_solver=solver, has_aux=True
            )
        )()

    _, plain, plain_info = run(None)
    _, jacobi, jacobi_info = run(bx.JacobiPreconditioner(num_samples=64))
    assert relerr(jacobi, exact) < 1e-7
    assert relerr(plain, exact) < 1e-6
    # Measured: 158 plain iterations against 45 preconditioned ones.
    assert int(jacobi_info.solve_steps) * 2 < int(plain_info.solve_steps)


@pytest.mark.slow
def test_user_preconditioner_exact_inverse_needs_one_step():
    inner, outer, w_star, lam, train, val, exact, A = scaled_ridge(d=8)
    inverse = lx.TaggedLinearOperator(
        lx.MatrixLinearOperator(jnp.linalg.inv(A)),
        (lx.symmetric_tag, lx.positive_semidefinite_tag),
    )
    _, hgrad, info = bx.implicit_hypergrad(
        outer,
        inner,
        w_star,
        lam,
        train,
        val,
        linear_solver=bx.Preconditioned(lx.CG(rtol=1e-10, atol=1e-10), inverse),
        has_aux=True,
    )
    assert relerr(hgrad, exact) < 1e-8
    assert int(info.solve_steps) <= 2


def test_hutchinson_diagonal_is_unbiased():
    # With all 2^n sign vectors... approximately: many samples give the diagonal to ~5%.
    A = jnp.asarray(np.diag([1.0, 10.0, 100.0]) + 0.1)
    op = lx.MatrixLinearOperator(A)
    P = bx.JacobiPreconditioner(num_samples=2000).build(op, jax.random.key(1))
    assert relerr(1 / P.as_matrix().diagonal(), jnp.diag(A)) < 0.05


def _saddle(eigenvalues, seed=0):
    """L = ½ wᵀAw − (Bλ)ᵀw with A symmetric of the given spectrum, E = ½‖w − c‖²."""
    rng = np.random.default_rng(seed)
    d = len(eigenvalues)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    A = jnp.asarray(Q @ np.diag(eigenvalues) @ Q.T)
    A = (A + A.T) / 2
    B = jnp.asarray(rng.normal(size=(d, 2)))
    c = jnp.asarray(rng.normal(size=d))
    inner = lambda w, lam, data: 0.5 * w @ A @ w - (B @ lam) @ w
    outer = lambda w, lam, data: 0.5 * jnp.sum((w - c) ** 2)
    return inner, outer, A, B, c


def _diagnosed(outer, inner, w, lam, solver, throw=True):
    """The hypergradient, its info, and `bx.diagnostics.hypergrad_info` (Lanczos, no
    estimate) from that info."""

    @jax.jit
    def run():
        _, hgrad, aux = bx.implicit_hypergrad(
            outer, inner, w, lam, linear_solver=solver, has_aux=True, throw=throw
        )
        info = bx.diagnostics.hypergrad_info(
            outer, inner, w, lam, None, None, aux, estimate_error=False
        )
        return hgrad, aux, info

    return run()


@pytest.mark.slow
def test_indefinite_hessian_is_reported_and_gmres_solves_it():
    inner, outer, A, B, c = _saddle([-2.0, -0.5, 1.0, 3.0, 5.0, 8.0])
    lam = jnp.asarray([0.3, -1.0])
    w = jnp.linalg.solve(A, B @ lam)  # a stationary point: a saddle, not a minimiser
    exact = B.T @ jnp.linalg.solve(A, w - c)  # the implicit function theorem still holds
    for solver in [lx.CG(rtol=1e-10, atol=1e-10), lx.GMRES(rtol=1e-12, atol=1e-12)]:
        hgrad, aux, info = _diagnosed(outer, inner, w, lam, solver)
        # The cheap info has no Lanczos: the solve itself went through.
        assert aux.result == bx.RESULTS.successful
        assert info.result == bx.RESULTS.not_positive_definite
        assert not bool(info.positive_definite)
        assert float(info.hessian_min) == pytest.approx(-2.0, rel=1e-8)
    # GMRES does not need definiteness: its answer (reported as such) is right.
    assert relerr(hgrad, exact) < 1e-8


@pytest.mark.slow
def test_indefinite_hessian_outranks_a_non_stationary_point():
    # Away from the saddle the gradient is not zero, and the Hessian is still indefinite:
    # the documented order of the results puts `not_positive_definite` first.
    inner, outer, A, B, c = _saddle([-2.0, -0.5, 1.0, 3.0, 5.0, 8.0])
    lam = jnp.asarray([0.3, -1.0])
    w = jnp.linalg.solve(A, B @ lam) + 0.1
    _, aux, info = _diagnosed(outer, inner, w, lam, lx.GMRES(rtol=1e-12, atol=1e-12))
    assert float(aux.inner_grad_norm) > 1e-6
    assert aux.result == bx.RESULTS.not_stationary
    assert float(info.hessian_min) == pytest.approx(-2.0, rel=1e-8)
    assert info.result == bx.RESULTS.not_positive_definite
    assert not bool(info.positive_definite)


@pytest.mark.slow
def test_indefinite_hessian_breaks_bx_cg_down():
    # `bx.CG` checks the curvature of each direction: on a saddle it stops and says so.
    inner, outer, A, B, c = _saddle([-2.0, -0.5, 1.0, 3.0, 5.0, 8.0])
    lam = jnp.asarray([0.3, -1.0])
    w = jnp.linalg.solve(A, B @ lam)
    for solver in [bx.CG(rtol=1e-10, atol=0.0), None]:  # None: the default, `bx.CG`
        with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)):
            jax.block_until_ready(_diagnosed(outer, inner, w, lam, solver))
        hgrad, aux, _ = _diagnosed(outer, inner, w, lam, solver, throw=False)
        assert aux.result == bx.RESULTS.breakdown
        assert bool(jnp.all(jnp.isnan(hgrad)))


def test_singular_hessian_is_reported_and_damping_gives_the_regularised_answer():
    inner, outer, A, B, c = _saddle([0.0, 0.5, 1.0, 2.0])
    lam = jnp.asarray([0.3, -1.0])
    w = jnp.linalg.pinv(A) @ (B @ lam)
    mu = 1e-3
    damped = bx.Damped(lx.CG(rtol=1e-12, atol=1e-12), mu)
    hgrad, aux, info = _diagnosed(outer, inner, w, lam, damped)
    # Bλ has a component along the flat direction, so no w is stationary: said as well.
    assert float(aux.inner_grad_norm) > 1.0
    assert aux.result == bx.RESULTS.not_stationary
    assert info.result == bx.RESULTS.not_positive_definite
    expected = B.T @ jnp.linalg.solve(A + mu * jnp.eye(4), w - c)
    assert relerr(hgrad, expected) < 1e-8


def test_damped_solves_the_damped_system():
    A = jnp.asarray([[2.0, 1.0], [1.0, 3.0]])
    b = jnp.asarray([1.0, -1.0])
    operator = lx.TaggedLinearOperator(
        lx.MatrixLinearOperator(A), (lx.symmetric_tag, lx.positive_semidefinite_tag)
    )
    for solver in [lx.CG(rtol=1e-12, atol=1e-12), lx.LU()]:
        x = lx.linear_solve(operator, b, bx.Damped(solver, 0.5)).value
        assert relerr(x, jnp.linalg.solve(A + 0.5 * jnp.eye(2), b)) < 1e-12
    with pytest.raises(ValueError, match="damping"):
        bx.Damped(lx.LU(), -1.0)
    with pytest.raises(TypeError, match="solver"):
        bx.Damped("cg", 1.0)
    with pytest.raises(ValueError, match="num_samples"):
        bx.JacobiPreconditioner(num_samples=0)
