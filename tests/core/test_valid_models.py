"""Models as users write them go through every implicit path: a pytree with a leaf whose
optimality condition does not depend on the hyperparameters (an unpenalised bias), and a
Python-float hyperparameter under `jax.grad`. References are closed forms differentiated by
JAX through `jnp.linalg.solve` (`helpers.biased_ridge`), in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import biased_ridge, relerr

import bilevax as bx


PROBLEM = biased_ridge()
SOLVER = bx.GradientDescent(PROBLEM.learning_rate)


def exact_objective(lam, inner_data=PROBLEM.inner_data):
    """E(w*(λ)) with w* the closed form on `inner_data` (λ one strength or one per weight)."""
    X, y = inner_data
    Z = jnp.concatenate([X, jnp.ones((X.shape[0], 1))], axis=1)
    penalty = jnp.concatenate([jnp.broadcast_to(jnp.exp(lam), X.shape[1:]), jnp.zeros(1)])
    theta = jnp.linalg.solve(Z.T @ Z / len(y) + jnp.diag(penalty), Z.T @ y / len(y))
    params = {"w": theta[:-1], "b": theta[-1]}
    return PROBLEM.outer(params, lam, PROBLEM.outer_data)


def objective(lam, inner_data=PROBLEM.inner_data, init=PROBLEM.init):
    """E(w*(λ)) through `inner_solve` with the implicit adjoint."""
    solution = bx.inner_solve(
        PROBLEM.inner,
        init,
        lam,
        inner_data,
        solver=SOLVER,
        max_steps=20_000,
        tol=1e-12,
        adjoint=bx.ImplicitAdjoint(),
        throw=True,
    )
    return PROBLEM.outer(solution.params, lam, PROBLEM.outer_data)


def test_the_closed_form_is_what_autodiff_of_the_closed_form_gives():
    # The zoo's hand-derived hypergradient and JAX's derivative of the solve agree: the
    # reference below is sound.
    exact = PROBLEM.exact_hypergrad(PROBLEM.hparams)
    assert relerr(jax.grad(exact_objective)(PROBLEM.hparams), exact) < 1e-12


@pytest.mark.parametrize(
    "transform", ["grad", "jvp", pytest.param("hessian", marks=pytest.mark.slow)]
)
def test_inner_solve_with_an_unpenalised_bias(transform):
    lam = PROBLEM.hparams
    if transform == "grad":
        got, want = jax.jit(jax.grad(objective))(lam), PROBLEM.exact_hypergrad(lam)
        tol = 1e-8
    elif transform == "jvp":
        direction = jnp.linspace(-1.0, 1.0, lam.size)
        got = jax.jit(lambda t: jax.jvp(objective, (lam,), (t,))[1])(direction)
        want = jnp.vdot(PROBLEM.exact_hypergrad(lam), direction)
        tol = 1e-8
    else:
        got, want = jax.jit(jax.hessian(objective))(lam), jax.hessian(exact_objective)(lam)
        tol = 1e-6
    assert relerr(got, want) < tol


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_implicit_hypergrad_with_an_unpenalised_bias(mode):
    params_star = PROBLEM.exact_params(PROBLEM.hparams)
    value, hypergrad = bx.implicit_hypergrad(
        PROBLEM.outer,
        PROBLEM.inner,
        params_star,
        PROBLEM.hparams,
        PROBLEM.inner_data,
        PROBLEM.outer_data,
        mode=mode,
    )
    assert relerr(hypergrad, PROBLEM.exact_hypergrad(PROBLEM.hparams)) < 1e-9
    assert np.isclose(value, exact_objective(PROBLEM.hparams), rtol=1e-12)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_implicit_diff_with_an_unpenalised_bias(mode):
    solve = lambda init, lam, data: PROBLEM.exact_params(lam)  # noqa: ARG005
    optimality = jax.grad(PROBLEM.inner)
    solve = bx.implicit_diff(solve, optimality, symmetric=True)
    fn = lambda lam: PROBLEM.outer(solve(None, lam, PROBLEM.inner_data), lam, PROBLEM.outer_data)
    differentiate = jax.grad if mode == "reverse" else jax.jacfwd
    got = differentiate(fn)(PROBLEM.hparams)
    assert relerr(got, PROBLEM.exact_hypergrad(PROBLEM.hparams)) < 1e-9


def test_vmap_over_tasks_with_an_unpenalised_bias():
    # Two tasks: the training data, and the same data with the targets shifted by 2 (which
    # moves only the bias at fixed weights, and so, through the coupling, the hypergradient).
    X, y = PROBLEM.inner_data
    tasks = (jnp.stack([X, X]), jnp.stack([y, y + 2.0]))
    got = jax.jit(jax.vmap(jax.grad(objective), in_axes=(None, 0)))(PROBLEM.hparams, tasks)
    for task in range(2):
        want = jax.grad(exact_objective)(PROBLEM.hparams, (tasks[0][task], tasks[1][task]))
        assert relerr(got[task], want) < 1e-8
    assert relerr(got[0], got[1]) > 1e-3  # the tasks differ, so the batch is not one task


def test_a_python_float_hyperparameter_through_jax_grad():
    # One shared strength exp(λ) for every weight, given as a Python float.
    lam = 0.3
    got = jax.grad(objective)(lam)
    want = jax.grad(exact_objective)(jnp.asarray(lam))
    assert relerr(got, want) < 1e-8
