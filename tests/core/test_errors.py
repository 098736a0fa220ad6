"""Bad input fails at trace time with an error that names the argument at fault."""

import dataclasses

import jax
import jax.numpy as jnp
import lineax as lx
import optax
import pytest
from helpers import implicit, relerr, ridge

import bilevax as bx


@pytest.fixture
def problem():
    return ridge()


def _inner_solve(problem, **kwargs):
    init = kwargs.pop("init", problem.init)
    inner = kwargs.pop("inner", problem.inner)
    return bx.inner_solve(inner, init, problem.hparams, problem.inner_data, **kwargs)


def _unrolled(problem, **kwargs):
    init = kwargs.pop("init", problem.init)
    return bx.unrolled_hypergrad(
        problem.outer,
        problem.inner,
        init,
        problem.hparams,
        problem.inner_data,
        problem.outer_data,
        **kwargs,
    )


def _implicit(problem, **kwargs):
    return implicit(problem, kwargs.pop("params_star", problem.init), **kwargs)


@pytest.mark.parametrize(
    "call, kwargs, error, name",
    [
        (_inner_solve, dict(solver="sgd"), TypeError, "solver"),
        (_inner_solve, dict(solver=lambda h: 0.1), TypeError, "solver"),
        (_inner_solve, dict(adjoint="implicit"), TypeError, "adjoint"),
        (_inner_solve, dict(max_steps=-1), ValueError, "max_steps"),
        (_inner_solve, dict(max_steps=2.5), ValueError, "max_steps"),
        (_inner_solve, dict(tol=-1e-3), ValueError, "tol"),
        (_inner_solve, dict(init=jnp.zeros(5, dtype=jnp.int32)), TypeError, "init"),
        (_inner_solve, dict(init=jnp.zeros(7)), TypeError, "init"),
        (_inner_solve, dict(inner=lambda w, h, d: w), ValueError, "inner_loss"),
        (_inner_solve, dict(inner="loss"), TypeError, "inner_loss"),
        (_unrolled, dict(mode="sideways"), ValueError, "mode"),
        (_unrolled, dict(num_steps=-3), ValueError, "num_steps"),
        (_unrolled, dict(truncate=0), ValueError, "truncate"),
        (_unrolled, dict(checkpoints=0), ValueError, "checkpoints"),
        (_unrolled, dict(solver=object()), TypeError, "solver"),
        (_unrolled, dict(init={"w": jnp.zeros(5)}), TypeError, "init"),
        (_implicit, dict(mode="backward"), ValueError, "mode"),
        (_implicit, dict(linear_solver="cg"), TypeError, "linear_solver"),
        (_implicit, dict(params_star=jnp.zeros(3)), TypeError, "params_star"),
    ],
)
def test_bad_argument_is_named(problem, call, kwargs, error, name):
    with pytest.raises(error, match=f"`{name}"):
        call(problem, **kwargs)


def test_bad_adjoint_and_solver_configuration():
    with pytest.raises(TypeError, match="`linear_solver`"):
        bx.ImplicitAdjoint(linear_solver="cg")
    with pytest.raises(ValueError, match="`checkpoints`"):
        bx.UnrolledAdjoint(checkpoints=-2)
    with pytest.raises(ValueError, match="`steps`"):
        bx.Neumann(steps=-1)


def test_linearized_response_tangent_mismatch():
    fn = lambda lam: jnp.sin(lam)
    with pytest.raises(ValueError, match="`tangent`"):
        bx.linearized_response(fn, jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match="`tangent`"):
        bx.linearized_response(fn, {"a": jnp.zeros(3)}, {"b": jnp.zeros(3)})


def _implicit_diff(problem, **kwargs):
    solve_fn = kwargs.pop("solve_fn", lambda init, lam, data: problem.init)
    optimality_fn = kwargs.pop("optimality_fn", jax.grad(problem.inner))
    return bx.implicit_diff(solve_fn, optimality_fn, **kwargs)


def _hoag(problem, **kwargs):
    return bx.contrib.HOAG(**kwargs)


def _info(problem, **kwargs):
    adjoint = kwargs.pop("adjoint", jnp.zeros(5))
    zero = jnp.asarray(0.0)
    info = bx.HypergradInfo(bx.RESULTS.successful, zero, zero, jnp.asarray(0), adjoint)
    info = kwargs.pop("info", info)
    return bx.diagnostics.hypergrad_info(
        problem.outer,
        problem.inner,
        problem.init,
        problem.hparams,
        problem.inner_data,
        problem.outer_data,
        info,
        **kwargs,
    )


def _linearized(problem, **kwargs):
    fn = kwargs.pop("fn", jnp.sin)
    return bx.linearized_response(fn, jnp.zeros(3), kwargs.pop("tangent", jnp.zeros(3)))


@pytest.mark.parametrize(
    "call, kwargs, error, name",
    [
        # inner_solve: every argument.
        (_inner_solve, dict(solver=bx.GradientDescent), TypeError, "solver"),
        (_inner_solve, dict(solver=optax.adam), TypeError, "solver"),
        (_inner_solve, dict(adjoint=bx.ImplicitAdjoint), TypeError, "adjoint"),
        (_inner_solve, dict(tol=None), TypeError, "tol"),
        (_inner_solve, dict(tol=jnp.asarray(-1.0)), ValueError, "tol"),
        (_inner_solve, dict(tol=jnp.ones(3)), TypeError, "tol"),
        (_inner_solve, dict(tol="1e-6"), TypeError, "tol"),
        (_inner_solve, dict(max_steps=None), ValueError, "max_steps"),
        (_inner_solve, dict(throw="yes"), TypeError, "throw"),
        (_inner_solve, dict(inner=lambda w, h, d: jnp.sum(w) * 1j), ValueError, "inner_loss"),
        # unrolled_hypergrad
        (_unrolled, dict(hparams=3), TypeError, "hparams"),
        (_unrolled, dict(solver=bx.GradientDescent), TypeError, "solver"),
        (_unrolled, dict(outer=None), TypeError, "outer_loss"),
        # implicit_hypergrad
        (_implicit, dict(hparams=jnp.arange(5)), TypeError, "hparams"),
        (_implicit, dict(linear_solver=bx.CG), TypeError, "linear_solver"),
        (_implicit, dict(has_aux=1), TypeError, "has_aux"),
        (_implicit, dict(throw=None), TypeError, "throw"),
        (_implicit, dict(tol=-1.0), ValueError, "tol"),
        (_implicit, dict(adjoint_init=jnp.zeros(3)), ValueError, "adjoint_init"),
        (_implicit, dict(outer=lambda w, h, d: w), ValueError, "outer_loss"),
        # implicit_diff
        (_implicit_diff, dict(solve_fn=None), TypeError, "solve_fn"),
        (_implicit_diff, dict(optimality_fn="grad"), TypeError, "optimality_fn"),
        (_implicit_diff, dict(linear_solver=lx.CG), TypeError, "linear_solver"),
        (_implicit_diff, dict(symmetric="yes"), TypeError, "symmetric"),
        (_implicit_diff, dict(has_aux=None), TypeError, "has_aux"),
        (_implicit_diff, dict(throw=0), TypeError, "throw"),
        # linearized_response
        (_linearized, dict(fn=3), TypeError, "fn"),
        (_linearized, dict(tangent=jnp.zeros(2)), ValueError, "tangent"),
        # diagnostics
        (_info, dict(adjoint=jnp.zeros(2)), ValueError, "info.adjoint"),
        (_info, dict(info=jnp.zeros(5)), TypeError, "info"),
        (_info, dict(lanczos_steps=-1), ValueError, "lanczos_steps"),
        (_info, dict(estimate_error="no"), TypeError, "estimate_error"),
        # HOAG
        (_hoag, dict(solver=optax.adam), TypeError, "solver"),
        (_hoag, dict(max_steps=0), ValueError, "max_steps"),
        (_hoag, dict(initial_tol=-1.0), ValueError, "initial_tol"),
        (_hoag, dict(decay=0.0), ValueError, "decay"),
        (_hoag, dict(final_tol=0.0), ValueError, "final_tol"),
        (_hoag, dict(throw="no"), TypeError, "throw"),
    ],
)
def test_every_argument_is_named(problem, call, kwargs, error, name):
    if "hparams" in kwargs:
        problem = dataclasses.replace(problem, hparams=kwargs.pop("hparams"))
    if "outer" in kwargs:
        problem = dataclasses.replace(problem, outer=kwargs.pop("outer"))
    with pytest.raises(error, match=f"`{name}"):
        call(problem, **kwargs)


@pytest.mark.parametrize(
    "make, error, name",
    [
        (lambda: bx.ImplicitAdjoint(linear_solver=lx.CG), TypeError, "linear_solver"),
        (lambda: bx.ImplicitAdjoint(throw="yes"), TypeError, "throw"),
        (lambda: bx.UnrolledAdjoint(truncate=0), ValueError, "truncate"),
        (lambda: bx.CG(rtol=-1.0, atol=0.0), ValueError, "rtol"),
        (lambda: bx.CG(rtol=0.0, atol=-1.0), ValueError, "atol"),
        (lambda: bx.CG(rtol=1e-6, atol=0.0, max_steps=-1), ValueError, "max_steps"),
        (lambda: bx.Neumann(steps=2.5), ValueError, "steps"),
        (lambda: bx.Damped(solver=lx.CG, damping=0.1), TypeError, "solver"),
        (lambda: bx.Damped(solver=bx.CG(1e-6, 0.0), damping=-1.0), ValueError, "damping"),
        (lambda: bx.Preconditioned(bx.CG(1e-6, 0.0), "jacobi"), TypeError, "preconditioner"),
        (lambda: bx.Preconditioned("cg", bx.JacobiPreconditioner()), TypeError, "solver"),
        (lambda: bx.JacobiPreconditioner(num_samples=0), ValueError, "num_samples"),
        (lambda: bx.GradientDescent("fast"), TypeError, "learning_rate"),
        (lambda: bx.GradientDescent(0.1, momentum=1.5), ValueError, "momentum"),
        (lambda: bx.ProximalGradient(0.1, prox="lasso"), TypeError, "prox"),
        (lambda: bx.ProjectedGradient(0.1, projection=None), TypeError, "projection"),
    ],
)
def test_every_constructor_argument_is_named(make, error, name):
    with pytest.raises(error, match=f"`{name}"):
        make()


def test_implicit_diff_takes_keyword_arguments(problem):
    # The wrapper has `solve_fn`'s signature, keywords included, and differentiates them.
    X, y = problem.inner_data

    def ridge(init, lam, X, y):
        del init
        return jnp.linalg.solve(X.T @ X / X.shape[0] + jnp.diag(jnp.exp(lam)), X.T @ y / X.shape[0])

    loss = lambda w, lam, X, y: problem.inner(w, lam, (X, y))
    solve = bx.implicit_diff(ridge, jax.grad(loss), symmetric=True)
    by_position = jax.jacfwd(lambda lam: solve(None, lam, X, y))(problem.hparams)
    by_keyword = jax.jacfwd(lambda lam: solve(None, lam=lam, X=X, y=y))(problem.hparams)
    assert relerr(by_keyword, by_position) < 1e-14
    assert relerr(by_position, jax.jacfwd(problem.exact_params)(problem.hparams)) < 1e-8
    with pytest.raises(TypeError, match="solve_fn"):
        solve(None, lam=problem.hparams, X=X, y=y, z=1.0)


@pytest.mark.parametrize("hparams", [0.5, 1])
def test_python_scalar_hparams(hparams):
    # A Python float is made an array (its hypergradient is a number, not `None`); an int has
    # no hypergradient and is refused, naming `hparams`.
    inner = lambda w, lam, d: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w**2)
    outer = lambda w, lam, d: 0.5 * jnp.sum(w**2)
    w_star = jnp.full(3, 1.0 / (1.0 + hparams))
    exact = -3.0 / (1.0 + hparams) ** 3  # d/dλ of 3/(2(1+λ)²)
    for call in (
        lambda: bx.implicit_hypergrad(outer, inner, w_star, hparams),
        lambda: bx.unrolled_hypergrad(
            outer, inner, jnp.zeros(3), hparams, solver=bx.GradientDescent(0.5), num_steps=200
        ),
    ):
        if isinstance(hparams, int):
            with pytest.raises(TypeError, match="`hparams`"):
                call()
        else:
            _, hgrad = call()
            assert abs(float(hgrad) - exact) < 1e-8


def test_hparams_only_in_the_outer_loss_give_the_direct_term(problem):
    # The inner loss ignores λ: w* does not move, the hypergradient is ∂_λ E.
    inner = lambda w, lam, d: problem.inner(w, jnp.zeros(5), d)
    outer = lambda w, lam, d: problem.outer(w, lam, d) + jnp.sum(lam**2)
    w_star = jnp.linalg.solve(
        problem.inner_data[0].T @ problem.inner_data[0] / problem.inner_data[0].shape[0]
        + jnp.eye(5),
        problem.inner_data[0].T @ problem.inner_data[1] / problem.inner_data[0].shape[0],
    )
    direct = 2 * problem.hparams
    for mode in ("reverse", "forward"):
        _, hgrad = bx.implicit_hypergrad(
            outer, inner, w_star, problem.hparams, problem.inner_data, problem.outer_data, mode=mode
        )
        assert relerr(hgrad, direct) < 1e-14

    def E(lam):
        sol = bx.inner_solve(
            inner,
            problem.init,
            lam,
            problem.inner_data,
            solver=bx.GradientDescent(problem.learning_rate),
            max_steps=5000,
            tol=1e-10,
        )
        return outer(sol.params, lam, problem.outer_data)

    assert relerr(jax.grad(E)(problem.hparams), direct) < 1e-14
    assert relerr(jax.jacfwd(E)(problem.hparams), direct) < 1e-14
