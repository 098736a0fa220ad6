"""Recursive checkpointing of unrolls, `checkpoints="recursive"`: the same derivatives as the
plain unroll in every mode and transformation, and scratch memory that grows like log T."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import ALL, logistic, relerr, ridge

import bilevax as bx


# 1·64 + 1·8 + 3 in base 8: one scan per digit, a block of 64 steps (8 blocks of 8, each
# checkpointed), a block of 8, and 3 single steps.
T = 75


def _hand_loop(problem, num_steps=T, truncate=None):
    """The unrolled objective as a plain Python loop: an implementation independent of
    `bx`'s loops, for JAX to differentiate."""

    def objective(hparams):
        w = problem.init
        for t in range(num_steps):
            if truncate is not None and t == num_steps - truncate:
                w = jax.lax.stop_gradient(w)
            grad = eqx.filter_grad(problem.inner)(w, hparams, problem.inner_data)
            w = eqx.apply_updates(w, jax.tree.map(lambda g: -problem.learning_rate * g, grad))
        return problem.outer(w, hparams, problem.outer_data)

    return jax.value_and_grad(objective)


def _unrolled(problem, hparams=None, **kwargs):
    kwargs.setdefault("solver", bx.GradientDescent(problem.learning_rate))
    kwargs.setdefault("num_steps", T)
    return bx.unrolled_hypergrad(
        problem.outer,
        problem.inner,
        problem.init,
        problem.hparams if hparams is None else hparams,
        problem.inner_data,
        problem.outer_data,
        **kwargs,
    )


@pytest.mark.parametrize(
    "make_problem",
    [pytest.param(make, marks=() if make is ridge else pytest.mark.slow) for make in ALL],
)
def test_same_hypergradient_as_plain_unroll(make_problem):
    problem = make_problem()
    plain_value, plain = _unrolled(problem)
    value, recursive = _unrolled(problem, checkpoints="recursive")
    assert float(value) == pytest.approx(float(plain_value), rel=1e-12)
    assert relerr(recursive, plain) < 1e-12
    _, forward = _unrolled(problem, checkpoints="recursive", mode="forward")
    assert relerr(forward, recursive) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("make_problem", ALL)
def test_matches_hand_written_loop(make_problem):
    # The derivative of the unrolled map, written independently of `bx`'s loops.
    problem = make_problem()
    _, reference = _hand_loop(problem)(problem.hparams)
    _, recursive = _unrolled(problem, checkpoints="recursive")
    assert relerr(recursive, reference) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("num_steps", [1, 7, 8, 9, 64, 512])
def test_every_number_of_steps(num_steps):
    # Lengths at and around powers of the branching factor: one digit, a level's edge.
    problem = ridge()
    plain_value, plain = _unrolled(problem, num_steps=num_steps)
    value, recursive = _unrolled(problem, num_steps=num_steps, checkpoints="recursive")
    assert float(value) == pytest.approx(float(plain_value), rel=1e-12)
    assert relerr(recursive, plain) < 1e-12


def test_composes_with_truncation():
    problem = ridge()
    _, plain = _unrolled(problem, num_steps=19, truncate=5)
    _, recursive = _unrolled(problem, num_steps=19, truncate=5, checkpoints="recursive")
    assert relerr(recursive, plain) < 1e-12
    _, untruncated = _unrolled(problem, num_steps=19)
    assert relerr(recursive, untruncated) > 1e-6  # truncation really changed the derivative


@pytest.mark.slow
def test_truncation_matches_stopped_hand_loop():
    problem = logistic()
    _, reference = _hand_loop(problem, truncate=5)(problem.hparams)
    _, recursive = _unrolled(problem, truncate=5, checkpoints="recursive")
    assert relerr(recursive, reference) < 1e-10


@pytest.mark.slow
def test_solver_state_is_carried_through_checkpoints():
    # Adam's moments and step count live in the carried state: a checkpoint that dropped or
    # reset them would change the iterates and the hypergradient.
    problem = logistic()
    solver = optax.adam(0.05)
    _, plain = _unrolled(problem, solver=solver, num_steps=19)
    _, recursive = _unrolled(problem, solver=solver, num_steps=19, checkpoints="recursive")
    assert relerr(recursive, plain) < 1e-12


def _inner_solve_objective(problem, adjoint, num_steps=19):
    def E(hparams):
        sol = bx.inner_solve(
            problem.inner,
            problem.init,
            hparams,
            problem.inner_data,
            solver=bx.GradientDescent(problem.learning_rate),
            max_steps=num_steps,
            adjoint=adjoint,
        )
        return problem.outer(sol.params, hparams, problem.outer_data)

    return E


def test_inner_solve_forward_and_reverse():
    problem = ridge()
    E = _inner_solve_objective(problem, bx.UnrolledAdjoint(checkpoints="recursive"))
    _, reference = _hand_loop(problem, num_steps=19)(problem.hparams)
    assert relerr(jax.grad(E)(problem.hparams), reference) < 1e-10
    direction = jnp.linspace(-1.0, 1.0, problem.hparams.size)
    tangent = jax.jvp(E, (problem.hparams,), (direction,))[1]
    assert float(tangent) == pytest.approx(float(jnp.vdot(reference, direction)), rel=1e-10)


@pytest.mark.slow
def test_hessian_through_checkpoints():
    # Second derivatives (forward over reverse) go through the checkpoints too.
    problem = ridge()
    recursive = _inner_solve_objective(problem, bx.UnrolledAdjoint(checkpoints="recursive"))
    plain = _inner_solve_objective(problem, bx.UnrolledAdjoint())
    hessian = jax.jacfwd(jax.grad(recursive))(problem.hparams)
    assert relerr(hessian, jax.jacfwd(jax.grad(plain))(problem.hparams)) < 1e-12


@pytest.mark.slow
def test_vmap_over_tasks():
    problem = ridge()
    batch = problem.hparams + jnp.array([[0.0], [0.5], [-1.0]])
    recursive = lambda h: _unrolled(problem, h, num_steps=19, checkpoints="recursive")
    batched = jax.vmap(recursive)(batch)
    for i, hparams in enumerate(batch):
        _, plain = _unrolled(problem, hparams, num_steps=19)
        assert relerr(batched[1][i], plain) < 1e-12


def test_diverging_unroll_gives_nan():
    # Far past the stable step size the iterates overflow: no finite hypergradient.
    problem = ridge()
    solver = bx.GradientDescent(1e20)
    value, hgrad = _unrolled(problem, solver=solver, num_steps=19, checkpoints="recursive")
    assert jnp.isnan(value) and bool(jnp.all(jnp.isnan(hgrad)))


@pytest.mark.parametrize("bad", ["binomial", 0, -3, 2.5, True])
def test_bad_checkpoints_raise(bad):
    with pytest.raises(ValueError, match="`checkpoints`"):
        bx.UnrolledAdjoint(checkpoints=bad)
    with pytest.raises(ValueError, match="`checkpoints`"):
        _unrolled(ridge(), checkpoints=bad)


def _scratch_bytes(problem, num_steps, checkpoints) -> int:
    """The scratch memory XLA reserves for the compiled hypergradient."""
    f = lambda h: _unrolled(problem, h, num_steps=num_steps, checkpoints=checkpoints)[1]
    return jax.jit(f).lower(problem.hparams).compile().memory_analysis().temp_size_in_bytes


def test_scratch_memory_grows_like_log_steps():
    # T from 64 to 4096: two more levels of blocks on top of three, so memory a + b log T
    # about doubles (log 4096 / log 64 = 2; measured 2.03); O(√T) would grow 8 times, O(T) 64.
    problem = ridge(n=50, d=40)
    small, large = (_scratch_bytes(problem, n, "recursive") for n in (64, 4096))
    assert small < large < 2.5 * small


@pytest.mark.slow
def test_scratch_memory_per_level_is_constant():
    # Memory a + b log T: each factor of 8 in T adds one level, the same number of bytes;
    # and at T = 4096 less than one level of √T = 64 checkpoints needs.
    problem = ridge(n=50, d=40)
    memory = [_scratch_bytes(problem, 8**k, "recursive") for k in (2, 3, 4, 5)]
    increments = [b - a for a, b in zip(memory, memory[1:])]
    assert 0 < min(increments) and max(increments) < 1.25 * min(increments)
    assert memory[2] < 0.5 * _scratch_bytes(problem, 8**4, 64)
