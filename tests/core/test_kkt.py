"""`bx.kkt_optimality` with `bx.implicit_diff`: the primal and both duals of constrained
problems with closed-form solutions, differentiated in forward and reverse mode (under `jit`
and `vmap`) and checked against float64 central differences of the closed forms; a weakly
active constraint and a point that is not a KKT point are reported, never differentiated."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import relerr

import bilevax as bx


RNG = np.random.default_rng(0)


def half_distance(x, theta, *_):
    return 0.5 * jnp.sum((x - theta) ** 2)


# -- problems with closed forms: (solve_fn, optimality, args) ----------------------------------


def halfspace():
    """Projection onto aᵀx ≤ b: x = θ − μa, μ = max(aᵀθ − b, 0)/‖a‖²."""

    def solve(init, theta, a, b):
        del init
        mu = jnp.maximum(a @ theta - b, 0.0) / (a @ a)
        return theta - mu * a, None, mu

    ineq = lambda x, theta, a, b: a @ x - b
    args = (jnp.asarray(RNG.normal(size=4)), jnp.asarray(RNG.normal(size=4)), jnp.asarray(-0.3))
    return solve, bx.kkt_optimality(half_distance, None, ineq), args


def box():
    """Projection onto l ≤ x ≤ u, some bounds active and some not, the multipliers a dict."""

    def solve(init, theta, lower, upper):
        del init
        x = jnp.clip(theta, lower, upper)
        mu = {"upper": jnp.maximum(theta - upper, 0.0), "lower": jnp.maximum(lower - theta, 0.0)}
        return x, None, mu

    ineq = lambda x, theta, lower, upper: {"upper": x - upper, "lower": lower - x}
    theta = jnp.asarray([-1.5, -0.2, 0.4, 1.7, 0.9])
    args = (theta, jnp.full(5, -1.0), jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.5]))
    return solve, bx.kkt_optimality(half_distance, None, ineq), args


def simplex():
    """Projection onto the simplex: 1ᵀx = 1 (ν = τ) and −x ≤ 0 (μ = max(τ − θ, 0))."""

    def solve(init, theta):
        del init
        n = theta.shape[0]
        u = jnp.sort(theta)[::-1]
        excess = jnp.cumsum(u) - 1.0
        k = jnp.arange(1, n + 1, dtype=theta.dtype)
        count = jnp.sum(u - excess / k > 0)
        tau = excess[count - 1] / count.astype(theta.dtype)
        return jnp.maximum(theta - tau, 0.0), tau, jnp.maximum(tau - theta, 0.0)

    eq = lambda x, theta: jnp.sum(x) - 1.0
    ineq = lambda x, theta: -x
    args = (jnp.asarray([0.9, -0.4, 0.35, 0.1, 1.2]),)
    return solve, bx.kkt_optimality(half_distance, eq, ineq), args


def eq_qp():
    """min ½xᵀQx + cᵀx s.t. Ax = b: the KKT system [[Q, Aᵀ], [A, 0]] (x, ν) = (−c, b)."""

    def solve(init, Q, c, A, b):
        del init
        Q = (Q + Q.T) / 2  # the loss sees only the symmetric part of a perturbed Q
        n, m = Q.shape[0], A.shape[0]
        kkt = jnp.block([[Q, A.T], [A, jnp.zeros((m, m))]])
        xnu = jnp.linalg.solve(kkt, jnp.concatenate([-c, b]))
        return xnu[:n], xnu[n:], None

    loss = lambda x, Q, c, A, b: 0.5 * x @ Q @ x + c @ x
    eq = lambda x, Q, c, A, b: A @ x - b
    M = RNG.normal(size=(4, 4))
    args = tuple(
        jnp.asarray(a)
        for a in (M @ M.T + np.eye(4), RNG.normal(size=4), RNG.normal(size=(2, 4)), [0.5, -1.0])
    )
    return solve, bx.kkt_optimality(loss, eq), args


PROBLEMS = {"halfspace": halfspace, "box": box, "simplex": simplex, "eq_qp": eq_qp}


def random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape)) for x in leaves])


def dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize(
    "name",
    # The simplex has both kinds of constraint; the others run with the slow tests.
    [n if n == "simplex" else pytest.param(n, marks=pytest.mark.slow) for n in PROBLEMS],
)
def test_primal_and_dual_derivatives_match_finite_differences(name):
    solve, optimality, args = PROBLEMS[name]()
    wrapped = bx.implicit_diff(solve, optimality)
    fn = lambda *args: wrapped(None, *args)
    direction = random_like(args, 1)
    cotangent = random_like(fn(*args), 2)

    @jax.jit
    def derivatives(args, direction, cotangent):
        _, tangent = jax.jvp(fn, args, direction)
        _, vjp = jax.vjp(fn, *args)
        return tangent, vjp(cotangent)

    tangent, vjp = derivatives(args, direction, cotangent)
    eps = 1e-6
    shifted = lambda s: solve(None, *jax.tree.map(lambda a, d: a + s * eps * d, args, direction))
    difference = jax.tree.map(lambda p, m: (p - m) / (2 * eps), shifted(1.0), shifted(-1.0))
    # Primal and duals, each against its closed form's central difference.
    for ours, fd in zip(tangent, difference):
        if fd is not None:
            assert relerr(ours, fd) < 1e-7, (ours, fd)
    # Reverse mode is the transpose of forward mode: ⟨c, J d⟩ = ⟨Jᵀc, d⟩.
    forward, reverse = float(dot(cotangent, tangent)), float(dot(vjp, direction))
    assert abs(forward - reverse) <= 1e-9 * max(abs(forward), 1.0)


@pytest.mark.slow
def test_vmap_and_linear_solvers_agree():
    """Per-problem Jacobians under `vmap`, with the default normal CG, `lx.LU` and `lx.GMRES`,
    equal those of the closed form differentiated by JAX itself."""
    solve, optimality, (theta, lower, upper) = box()
    thetas = jnp.stack([theta, -theta, 0.5 * theta + 0.3])
    expected = jax.vmap(jax.jacfwd(lambda t: solve(None, t, lower, upper)))(thetas)
    for linear_solver in (None, lx.LU(), lx.GMRES(1e-12, 1e-12)):
        wrapped = bx.implicit_diff(solve, optimality, linear_solver=linear_solver)
        jac = jax.jit(jax.vmap(jax.jacrev(lambda t: wrapped(None, t, lower, upper))))(thetas)
        assert relerr(jac, expected) < 1e-8


def degenerate_halfspace():
    """The halfspace problem at a θ on the boundary: aᵀθ = b, so x = θ and μ = 0."""
    solve, optimality, (theta, a, _) = halfspace()
    return solve, optimality, (theta, a, a @ theta)


def test_weakly_active_constraint_is_reported():
    solve, optimality, args = degenerate_halfspace()
    theta, a, b = args
    # The constraint turns active for one sign of the perturbation and not the other: the
    # one-sided differences of the closed form disagree, so there is no derivative to give.
    eps, d = 1e-6, a / jnp.linalg.norm(a)
    x = lambda s: solve(None, theta + s * d, a, b)[0]
    right, left = (x(eps) - x(0.0)) / eps, (x(0.0) - x(-eps)) / eps
    assert relerr(right, left) > 0.5
    assert optimality.check(solve(None, *args), *args, tol=1e-8) == (
        bx.RESULTS.degenerate_complementarity
    )
    loud = bx.implicit_diff(solve, optimality)
    with pytest.raises(Exception, match="weakly active"):
        jax.jit(jax.grad(lambda t: jnp.sum(loud(None, t, a, b)[0])))(theta)
    quiet = bx.implicit_diff(solve, optimality, throw=False)
    value, grad = jax.jit(jax.value_and_grad(lambda t: jnp.sum(quiet(None, t, a, b)[0])))(theta)
    assert jnp.isfinite(value)  # the solution is right; its derivative does not exist
    assert jnp.all(jnp.isnan(grad))


@pytest.mark.slow
def test_weakly_active_constraint_under_vmap_and_forward_mode():
    """Under `vmap`, only the degenerate problem's derivative is NaN; forward mode raises."""
    solve, optimality, (theta, a, b) = degenerate_halfspace()
    with pytest.raises(Exception, match="weakly active"):
        loud = bx.implicit_diff(solve, optimality)
        jax.jacfwd(lambda t: loud(None, t, a, b)[0])(theta)
    quiet = bx.implicit_diff(solve, optimality, throw=False)
    thetas = jnp.stack([theta, theta + 2 * a])
    bs = jnp.stack([b, b])
    jac = jax.vmap(jax.jacfwd(lambda t, b: quiet(None, t, a, b)[0]))(thetas, bs)
    assert jnp.all(jnp.isnan(jac[0])) and jnp.all(jnp.isfinite(jac[1]))


@pytest.mark.parametrize("x, mu", [(1.0, -0.5), pytest.param(2.0, 0.0, marks=pytest.mark.slow)])
def test_not_a_kkt_point_is_reported(x, mu):
    """min ½(x − θ)² s.t. x ≤ 1 at θ = 2 ... or 0.5: both `(x, μ)` are roots of F (x − θ + μ = 0,
    μ(x − 1) = 0), but one has μ < 0 and the other violates the constraint."""
    theta = jnp.asarray(x + mu)
    optimality = bx.kkt_optimality(half_distance, None, lambda x, theta: x - 1.0)
    solve = lambda init, theta: (jnp.asarray(x), None, jnp.asarray(mu))
    assert optimality.check(solve(None, theta), theta, tol=1e-8) == bx.RESULTS.kkt_infeasible
    with pytest.raises(Exception, match="not a KKT point"):
        jax.jit(jax.grad(lambda t: bx.implicit_diff(solve, optimality)(None, t)[0]))(theta)
    quiet = bx.implicit_diff(solve, optimality, throw=False)
    grad = jax.jit(jax.grad(lambda t: quiet(None, t)[0]))(theta)
    assert jnp.isnan(grad)


@pytest.mark.slow
def test_not_a_root_is_refused():
    """A primal off the constraint Ax = b is not a root of F: its derivative is refused, in
    reverse mode under `jit` too (which runs only the transposed solve)."""
    solve, optimality, args = eq_qp()

    def off(init, *args):
        x, nu, mu = solve(init, *args)
        return x + 1e-3, nu, mu

    for throw in (True, False):
        wrapped = bx.implicit_diff(off, optimality, throw=throw)
        grad = jax.jit(jax.grad(lambda c: jnp.sum(wrapped(None, args[0], c, *args[2:])[0])))
        if throw:
            with pytest.raises(Exception, match="not a root"):
                grad(args[1])
        else:
            assert jnp.all(jnp.isnan(grad(args[1])))


def test_bad_structure_is_refused_at_trace_time():
    solve, optimality, args = simplex()
    wrapped = bx.implicit_diff(lambda init, theta: solve(init, theta)[0], optimality)
    with pytest.raises(TypeError, match="triple"):
        wrapped(None, *args)
    no_dual = bx.implicit_diff(lambda init, theta: (*solve(init, theta)[:2], None), optimality)
    with pytest.raises(ValueError, match="dual_ineq"):
        no_dual(None, *args)
    extra = bx.implicit_diff(
        lambda init, theta: solve(init, theta), bx.kkt_optimality(half_distance)
    )
    with pytest.raises(ValueError, match="dual_eq"):
        extra(None, *args)
    with pytest.raises(TypeError, match="ineq_constraints"):
        bx.kkt_optimality(half_distance, None, 3.0)
