import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optax
import pytest
from helpers import (
    ALL,
    implicit,
    logistic,
    mlp,
    quadratic,
    reference_hypergrad,
    reference_solution,
    relerr,
    ridge,
)

import bilevax as bx


T = 30


def _hand_loop(problem, lr, num_steps, truncate=None):
    """The unrolled objective written as a plain Python loop, for JAX to differentiate."""

    def objective(hparams):
        w = problem.init
        for t in range(num_steps):
            if truncate is not None and t == num_steps - truncate:
                w = jax.lax.stop_gradient(w)
            grad = eqx.filter_grad(problem.inner)(w, hparams, problem.inner_data)
            w = eqx.apply_updates(w, jax.tree.map(lambda g: -lr * g, grad))
        return problem.outer(w, hparams, problem.outer_data)

    return jax.value_and_grad(objective)


def _unrolled(problem, **kwargs):
    kwargs.setdefault("solver", bx.GradientDescent(problem.learning_rate))
    kwargs.setdefault("num_steps", T)
    return bx.unrolled_hypergrad(
        problem.outer,
        problem.inner,
        problem.init,
        problem.hparams,
        problem.inner_data,
        problem.outer_data,
        **kwargs,
    )


LOOPS = {
    "reverse": dict(mode="reverse"),
    "forward": dict(mode="forward"),
    "checkpoints5": dict(checkpoints=5),
    "checkpoints7": dict(checkpoints=7),
    "checkpoints1": dict(checkpoints=1),
    "truncate=T": dict(truncate=T),
}
# Every loop on ridge by default, and some on logistic and the quadratic; the rest is slow.
QUICK_LOOPS = {
    ridge: set(LOOPS),
    logistic: {"reverse"},
    quadratic: {"reverse", "forward", "truncate=T"},
    mlp: set(),
}


@pytest.mark.parametrize(
    "make_problem, kwargs",
    [
        pytest.param(
            make,
            kwargs,
            id=f"{loop}-{make.__name__}",
            marks=() if loop in QUICK_LOOPS[make] else pytest.mark.slow,
        )
        for make in ALL
        for loop, kwargs in LOOPS.items()
    ],
)
def test_matches_hand_written_loop(make_problem, kwargs):
    problem = make_problem()
    ref_value, ref_grad = _hand_loop(problem, problem.learning_rate, T)(problem.hparams)
    value, hgrad = _unrolled(problem, **kwargs)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-12)
    assert relerr(hgrad, ref_grad) < 1e-10


@pytest.mark.parametrize("truncate", [1, 7])
def test_truncation_matches_stopped_loop(truncate):
    problem = logistic()
    _, ref_grad = _hand_loop(problem, problem.learning_rate, T, truncate)(problem.hparams)
    _, hgrad = _unrolled(problem, truncate=truncate)
    _, full = _unrolled(problem)
    assert relerr(hgrad, ref_grad) < 1e-10
    assert relerr(hgrad, full) > 1e-3  # truncation really drops part of the derivative


@pytest.mark.parametrize("make_problem", [ridge, pytest.param(logistic, marks=pytest.mark.slow)])
def test_unrolled_converges_to_implicit(make_problem):
    problem = make_problem()
    reference = reference_hypergrad(problem)
    errors = [relerr(_unrolled(problem, num_steps=n)[1], reference) for n in (10, 100, 1000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8
    w_star = reference_solution(problem)
    _, implicit_hgrad = implicit(problem, w_star, linear_solver=lx.CG(1e-12, 1e-12))
    assert relerr(_unrolled(problem, num_steps=1000)[1], implicit_hgrad) < 1e-8


def test_learned_initialisation_and_step_size():
    problem = ridge()
    hparams = {
        "lam": problem.hparams,
        "w0": 0.1 * jnp.ones(5),
        "log_lr": jnp.log(jnp.asarray(0.05)),
    }
    inner = lambda w, h, d: problem.inner(w, h["lam"], d)
    outer = lambda w, h, d: problem.outer(w, h["lam"], d)

    def hand(h):
        w, lr = h["w0"], jnp.exp(h["log_lr"])
        for _ in range(T):
            w = w - lr * jax.grad(inner)(w, h, problem.inner_data)
        return outer(w, h, problem.outer_data)

    ref_value, ref_grad = jax.value_and_grad(hand)(hparams)
    for mode in ("reverse", "forward"):
        value, hgrad = bx.unrolled_hypergrad(
            outer,
            inner,
            lambda h: h["w0"],
            hparams,
            problem.inner_data,
            problem.outer_data,
            solver=lambda h: bx.GradientDescent(jnp.exp(h["log_lr"])),
            num_steps=T,
            mode=mode,
        )
        assert float(value) == pytest.approx(float(ref_value), rel=1e-12)
        assert relerr(hgrad, ref_grad) < 1e-10
        assert abs(float(hgrad["log_lr"])) > 0 and float(jnp.abs(hgrad["w0"]).max()) > 0


def test_optax_momentum_equals_gradient_descent_momentum():
    problem = logistic()
    lr = problem.learning_rate
    _, ours = _unrolled(problem, solver=bx.GradientDescent(lr, momentum=0.9))
    _, theirs = _unrolled(problem, solver=optax.sgd(lr, momentum=0.9))
    assert relerr(ours, theirs) < 1e-12


@pytest.mark.parametrize(
    "make_problem", [ridge, pytest.param(logistic, marks=pytest.mark.slow), quadratic]
)
def test_unrolled_adjoint_in_inner_solve(make_problem):
    problem = make_problem()
    _, ref_grad = _hand_loop(problem, problem.learning_rate, T)(problem.hparams)

    def E(hparams, checkpoints):
        sol = bx.inner_solve(
            problem.inner,
            problem.init,
            hparams,
            problem.inner_data,
            solver=bx.GradientDescent(problem.learning_rate),
            max_steps=T,
            adjoint=bx.UnrolledAdjoint(checkpoints=checkpoints),
        )
        assert int(sol.stats["num_steps"]) == T
        return problem.outer(sol.params, hparams, problem.outer_data)

    for checkpoints in (None, 4):
        assert relerr(jax.grad(E)(problem.hparams, checkpoints), ref_grad) < 1e-10
        direction = jnp.ones_like(problem.hparams)
        tangent = jax.jvp(lambda h: E(h, checkpoints), (problem.hparams,), (direction,))[1]
        assert float(tangent) == pytest.approx(float(jnp.sum(ref_grad * direction)), rel=1e-10)


def test_checkpointing_reduces_stored_residuals():
    # A structural check of the O(k + T/k) memory claim: the number of saved residual
    # values in the reverse pass, read off the linearised jaxpr, not a timing.
    problem = ridge(n=50, d=40)
    num_steps = 400

    def saved(checkpoints):
        f = lambda h: bx.unrolled_hypergrad(
            problem.outer,
            problem.inner,
            problem.init,
            h,
            problem.inner_data,
            problem.outer_data,
            solver=bx.GradientDescent(problem.learning_rate),
            num_steps=num_steps,
            checkpoints=checkpoints,
        )[1]
        compiled = jax.jit(f).lower(problem.hparams).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, checkpointed = saved(None), saved(20)
    assert checkpointed < 0.25 * full


@pytest.mark.slow
def test_forward_mode_with_more_hyperparameters_than_one_chunk():
    # 300 scalar hyperparameters: forward mode pushes them in chunks, never all at once.
    B = jax.random.normal(jax.random.key(0), (4, 300))
    inner = lambda w, lam, B: 0.5 * jnp.sum(w**2) - (B @ lam) @ w
    outer = lambda w, lam, c: 0.5 * jnp.sum((w - c) ** 2) + 0.01 * jnp.sum(lam**2)
    lam, c = jnp.linspace(-1.0, 1.0, 300), jnp.ones(4)
    results = [
        bx.unrolled_hypergrad(
            outer,
            inner,
            jnp.zeros(4),
            lam,
            B,
            c,
            solver=bx.GradientDescent(0.5),
            num_steps=20,
            mode=mode,
        )
        for mode in ("reverse", "forward")
    ]
    assert float(results[0][0]) == pytest.approx(float(results[1][0]), rel=1e-14)
    assert relerr(results[1][1], results[0][1]) < 1e-12
