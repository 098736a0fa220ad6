"""Bad input fails at trace time with an error that names the argument at fault."""

import jax.numpy as jnp
import pytest
from helpers import implicit, ridge

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
