import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import optimistix as optx
import pytest
from helpers import CONVEX, logistic, mlp, reference_solution, relerr, ridge, solve

import bilevax as bx


def _solvers(lr):
    return {
        "gd": (bx.GradientDescent(lr), 1e-10),
        "gd-momentum": (bx.GradientDescent(lr / 2, momentum=0.5), 1e-10),
        "optax-sgd": (optax.sgd(lr), 1e-10),
        "optax-adam": (optax.adam(0.02), 1e-8),
        # A line search cannot resolve the loss below ~1e-16 relative, so BFGS stalls near
        # ‖∇L‖ ~ 1e-8 in float64: ask for less.
        "optimistix-bfgs": (optx.BFGS(rtol=1e-10, atol=1e-10), 1e-6),
    }


# Every solver on ridge; on logistic the first-order ones without Adam's steps are slow.
SLOW_ON_LOGISTIC = ("gd", "gd-momentum", "optax-sgd")


@pytest.mark.parametrize(
    "name, make_problem",
    [
        pytest.param(name, make, marks=pytest.mark.slow)
        if make is logistic and name in SLOW_ON_LOGISTIC
        else (name, make)
        for make in [ridge, logistic]
        for name in ["gd", "gd-momentum", "optax-sgd", "optax-adam", "optimistix-bfgs"]
    ],
)
def test_solution_matches_reference(make_problem, name):
    problem = make_problem()
    solver, tol = _solvers(problem.learning_rate)[name]
    sol = bx.inner_solve(
        problem.inner,
        problem.init,
        problem.hparams,
        problem.inner_data,
        solver=solver,
        max_steps=50_000,
        tol=tol,
    )
    assert sol.result == bx.RESULTS.successful
    assert float(sol.stats["grad_norm"]) <= tol
    assert 0 < int(sol.stats["num_steps"]) < 50_000
    # For a μ-strongly convex loss, ‖w − w*‖ ≤ ‖∇L‖/μ; μ ≥ the smallest L2 strength here.
    w_star = reference_solution(problem)
    assert relerr(sol.params, w_star) < 1e3 * tol


def test_gradient_descent_is_the_plain_iteration():
    problem = ridge()
    lr, steps = problem.learning_rate, 25
    sol = bx.inner_solve(
        problem.inner,
        problem.init,
        problem.hparams,
        problem.inner_data,
        solver=bx.GradientDescent(lr),
        max_steps=steps,
        tol=0.0,
    )
    w = problem.init
    for _ in range(steps):
        w = w - lr * jax.grad(problem.inner)(w, problem.hparams, problem.inner_data)
    assert relerr(sol.params, w) < 1e-14
    assert int(sol.stats["num_steps"]) == steps
    assert sol.result == bx.RESULTS.max_steps_reached


def test_equinox_module_params():
    problem = mlp()
    sol = solve(problem)
    assert sol.result == bx.RESULTS.successful
    assert isinstance(sol.params, eqx.nn.MLP)
    grad = eqx.filter_grad(problem.inner)(sol.params, problem.hparams, problem.inner_data)
    assert float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))) <= 1e-5


@pytest.mark.parametrize("adjoint", [bx.ImplicitAdjoint(), bx.UnrolledAdjoint()])
def test_vmap_over_tasks_equals_loop(adjoint):
    problem = ridge()
    hparams = jnp.stack([problem.hparams + s for s in (-1.0, 0.0, 1.5)])
    X, y = problem.inner_data
    datas = (jnp.stack([X, X[::-1], 2 * X]), jnp.stack([y, y[::-1], y]))
    solve = lambda h, d: bx.inner_solve(
        problem.inner,
        problem.init,
        h,
        d,
        solver=bx.GradientDescent(problem.learning_rate / 4),
        max_steps=3000,
        tol=1e-9,
        adjoint=adjoint,
    )
    batched = jax.vmap(solve)(hparams, datas)
    for i in range(3):
        single = solve(hparams[i], jax.tree.map(lambda x: x[i], datas))
        assert relerr(batched.params[i], single.params) < 1e-13
        assert int(batched.stats["num_steps"][i]) == int(single.stats["num_steps"])
        assert bool((batched.result == bx.RESULTS.successful)[i]) == bool(
            single.result == bx.RESULTS.successful
        )
    if isinstance(adjoint, bx.ImplicitAdjoint):
        # Each task stopped on its own test, so the step counts differ.
        assert len(set(batched.stats["num_steps"].tolist())) == 3


def test_max_steps_reached_and_throw():
    problem = logistic()
    kwargs = dict(solver=bx.GradientDescent(problem.learning_rate), max_steps=3, tol=1e-12)
    sol = bx.inner_solve(problem.inner, problem.init, problem.hparams, problem.inner_data, **kwargs)
    assert sol.result == bx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 3
    with pytest.raises(Exception, match="max_steps"):
        out = bx.inner_solve(
            problem.inner, problem.init, problem.hparams, problem.inner_data, throw=True, **kwargs
        )
        jax.block_until_ready(out.params)


@pytest.mark.parametrize("adjoint", [bx.ImplicitAdjoint(), bx.UnrolledAdjoint()])
def test_nonfinite_data_is_reported(adjoint):
    problem = ridge()
    X, y = problem.inner_data
    sol = bx.inner_solve(
        problem.inner,
        problem.init,
        problem.hparams,
        (X.at[0, 0].set(jnp.nan), y),
        max_steps=50,
        adjoint=adjoint,
    )
    assert sol.result == bx.RESULTS.nonfinite
    with pytest.raises(Exception, match="non-finite"):
        out = bx.inner_solve(
            problem.inner,
            problem.init,
            problem.hparams,
            (X.at[0, 0].set(jnp.inf), y),
            max_steps=50,
            adjoint=adjoint,
            throw=True,
        )
        jax.block_until_ready(out.params)


def test_successful_inside_jit():
    problem = ridge()
    solve = jax.jit(
        lambda h: bx.inner_solve(
            problem.inner,
            problem.init,
            h,
            problem.inner_data,
            solver=bx.GradientDescent(problem.learning_rate),
            max_steps=10_000,
            tol=1e-10,
            throw=True,
        )
    )
    sol = solve(problem.hparams)
    assert sol.result == bx.RESULTS.successful
    assert relerr(sol.params, problem.exact_params(problem.hparams)) < 1e-8


@pytest.mark.parametrize("make_problem", [*CONVEX, pytest.param(mlp, marks=pytest.mark.slow)])
def test_problem_zoo_reference_solutions_are_minimisers(make_problem):
    # The zoo's references must themselves be right before other tests trust them.
    problem = make_problem()
    start = problem.init
    if not problem.strongly_convex:
        start = solve(problem).params
    w = reference_solution(problem, start=start)
    grad = eqx.filter_grad(problem.inner)(w, problem.hparams, problem.inner_data)
    assert float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))) < 1e-10
    assert make_problem in CONVEX or not problem.strongly_convex


@pytest.mark.parametrize(
    "solver", [bx.GradientDescent(0.2), optax.adam(0.1), optx.BFGS(1e-8, 1e-8)], ids=type
)
def test_python_numbers_in_hparams(solver):
    # A Python float among the hyperparameters is a constant like any other: every kind of
    # solver gives what an array there gives (optimistix minimisers once refused it).
    loss = lambda w, hparams, data: jnp.sum((w - data) ** 2) + 0.5 * hparams["l2"] * jnp.sum(w**2)
    data = jnp.arange(3.0)
    solve = lambda hparams: (
        bx.inner_solve(
            loss, jnp.zeros(3), hparams, data, solver=solver, max_steps=500, tol=1e-10
        ).params
    )
    expected = data / 1.25  # the minimiser of |w - d|^2 + 0.25 |w|^2
    assert relerr(jax.jit(lambda: solve({"l2": 0.5}))(), expected) < 1e-8
    assert relerr(solve({"l2": jnp.asarray(0.5)}), expected) < 1e-8


@pytest.mark.parametrize(
    "minimiser",
    [
        pytest.param(optx.BFGS(1e-8, 1e-8), marks=pytest.mark.slow),
        optx.LBFGS(1e-8, 1e-8),
        pytest.param(optx.NonlinearCG(1e-8, 1e-8), marks=pytest.mark.slow),
        pytest.param(optx.GradientDescent(0.05, 1e-8, 1e-8), marks=pytest.mark.slow),
    ],
    ids=type,
)
def test_optimistix_loss_and_gradient_are_those_at_the_returned_point(minimiser):
    # The stopping test reuses the loss and gradient an optimistix step evaluated (rather
    # than evaluating them again): after every step they are those at the point it returned,
    # accepted and rejected steps alike.
    from bilevax._solver import as_inner_solver

    loss = lambda w, a: (
        jnp.sum(jnp.logaddexp(0.0, a @ w)) + 0.5 * jnp.sum(w**2) + jnp.sum(jnp.sin(w))
    )
    a = jax.random.normal(jax.random.key(0), (20, 5))
    solver = as_inner_solver(minimiser, None)
    w = jnp.ones(5)
    state = solver.init(loss, w, a)
    grad = jax.grad(loss)(w, a)

    @eqx.filter_jit
    def step(w, state, grad):
        w, state = solver.step(loss, w, grad, state, a)
        return w, state, solver.value_and_grad(loss, w, state, a)

    for _ in range(12):
        w, state, (value, grad) = step(w, state, grad)
        want_value, want_grad = jax.jit(jax.value_and_grad(loss))(w, a)
        # Equal up to how XLA fuses two programs (eagerly, they are bitwise equal): rounding
        # of ~1e-16 on a gradient that falls to ~1e-5 near the minimiser; a gradient taken at
        # another point would be off by O(1).
        assert float(value) == pytest.approx(float(want_value), rel=1e-13)
        assert relerr(grad, want_grad) < 1e-9
