"""`bx.solve_qp`: OSQP's ADMM differentiated through its KKT conditions. The solution and
both duals against jaxopt's `OSQP`, `BoxOSQP` and `EqualityConstrainedQP` on the same data,
derivatives against jaxopt's implicit derivatives and float64 central differences of the
active-set closed form; NaN data, a solve cut short, an infeasible and an unbounded program,
and a weakly active constraint each give their result code and NaN, never a number."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import relerr

import bilevax as bx


jaxopt = pytest.importorskip("jaxopt")
from jaxopt import linear_solve  # noqa: E402


def program(n=6, m=2, p=5, seed=0):
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(n, n))
    Q = M @ M.T + 0.1 * np.eye(n)
    data = (Q, rng.normal(size=n), rng.normal(size=(m, n)), rng.normal(size=m))
    data += (rng.normal(size=(p, n)), 0.1 * rng.normal(size=p))
    return tuple(jnp.asarray(x) for x in data)


PROGRAM = program()
solve = jax.jit(bx.solve_qp, static_argnames=("max_steps", "throw"))


def standard():
    return jax.numpy_dtype_promotion("standard")


def active_set_solution(Q, c, A, b, G, h, active):
    """The closed form of the program once its active inequalities are known: the equality
    constrained QP with rows `A` and `G[active]`, by one KKT system."""
    Q = (Q + Q.T) / 2
    E = jnp.concatenate([A, G[active]])
    e = jnp.concatenate([b, h[active]])
    n, k = Q.shape[0], E.shape[0]
    kkt = jnp.block([[Q, E.T], [E, jnp.zeros((k, k))]])
    xnu = jnp.linalg.solve(kkt, jnp.concatenate([-c, e]))
    mu = jnp.zeros(G.shape[0]).at[active].set(xnu[n + A.shape[0] :])
    return xnu[:n], xnu[n : n + A.shape[0]], mu


def test_matches_jaxopt_osqp_and_closed_form():
    sol = solve(*PROGRAM)
    assert sol.result == bx.RESULTS.successful
    with standard():
        ref = jaxopt.OSQP(tol=1e-10, maxiter=20_000).run(
            params_obj=PROGRAM[:2], params_eq=PROGRAM[2:4], params_ineq=PROGRAM[4:]
        )
    ours = (sol.primal, sol.dual_eq, sol.dual_ineq)
    assert relerr(ours, tuple(ref.params)) < 1e-7
    active = np.flatnonzero(np.asarray(sol.dual_ineq) > 1e-6)
    assert 0 < len(active) < PROGRAM[4].shape[0]  # some inequalities active, some not
    assert relerr(ours, active_set_solution(*PROGRAM, active)) < 1e-8


@pytest.mark.slow
def test_derivatives_match_finite_differences_and_jaxopt():
    """Forward and reverse mode with respect to all six arrays: against central differences
    of the active-set closed form (exact near the solution, so the difference is not blurred
    by the solver's tolerance), and jaxopt's OSQP implicit derivative."""
    active = np.flatnonzero(np.asarray(solve(*PROGRAM).dual_ineq) > 1e-6)
    rng = np.random.default_rng(1)
    direction = tuple(jnp.asarray(rng.normal(size=x.shape)) for x in PROGRAM)
    weights = [jnp.asarray(rng.normal(size=s)) for s in (6, 2, 5)]
    scalar = lambda s: sum(jnp.vdot(w, x) for w, x in zip(weights, s))
    ours = lambda *data: scalar(_triple(bx.solve_qp(*data)))

    @jax.jit
    def derivatives(data, direction):
        _, forward = jax.jvp(ours, data, direction)
        reverse = jax.grad(ours, argnums=tuple(range(6)))(*data)
        return forward, reverse

    forward, reverse = derivatives(PROGRAM, direction)
    eps = 1e-6
    closed = lambda s: scalar(
        active_set_solution(*(x + s * eps * d for x, d in zip(PROGRAM, direction)), active)
    )
    difference = (closed(1.0) - closed(-1.0)) / (2 * eps)
    assert abs(forward - difference) <= 1e-7 * abs(difference)
    assert relerr(sum(jnp.vdot(g, d) for g, d in zip(reverse, direction)), forward) < 1e-10

    def theirs(Q, c, A, b, G, h):
        with standard():
            solver = jaxopt.OSQP(
                tol=1e-10,
                maxiter=20_000,
                implicit_diff_solve=functools.partial(linear_solve.solve_normal_cg, tol=1e-12),
            )
            s = solver.run(params_obj=(Q, c), params_eq=(A, b), params_ineq=(G, h)).params
            return scalar(tuple(s))

    expected = jax.jit(jax.grad(theirs, argnums=tuple(range(6))))(*PROGRAM)
    assert relerr(reverse, expected) < 1e-6


def _triple(sol):
    return sol.primal, sol.dual_eq, sol.dual_ineq


@pytest.mark.slow
def test_equality_constrained_and_box_forms_match_jaxopt():
    Q, c, A, b, G, h = PROGRAM
    sol = solve(Q, c, A, b)
    assert sol.result == bx.RESULTS.successful and sol.dual_ineq is None
    with standard():
        ref = jaxopt.EqualityConstrainedQP(tol=1e-12).run(params_obj=(Q, c), params_eq=(A, b))
    assert relerr((sol.primal, sol.dual_eq), tuple(ref.params)[:2]) < 1e-7
    # BoxOSQP's l <= Gx <= u is G x <= u and -G x <= -l.
    lower, upper = h - 1.0, h
    box = solve(Q, c, None, None, jnp.concatenate([G, -G]), jnp.concatenate([upper, -lower]))
    with standard():
        ref = jaxopt.BoxOSQP(tol=1e-10, maxiter=20_000).run(
            params_obj=(Q, c), params_eq=G, params_ineq=(lower, upper)
        )
    assert relerr(box.primal, ref.params.primal[0]) < 1e-7
    # BoxOSQP's one multiplier per row is μ_upper − μ_lower.
    mu = box.dual_ineq
    assert relerr(mu[:5] - mu[5:], ref.params.dual_eq) < 1e-6


@pytest.mark.slow
def test_vmap_gives_each_program_its_own_solution():
    programs = [program(seed=s) for s in (0, 1, 2)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *programs)
    batch = jax.jit(jax.vmap(bx.solve_qp))(*stacked)
    assert np.all(np.asarray(batch.result._value) == bx.RESULTS.successful._value)
    for i, data in enumerate(programs):
        assert relerr(solve(*data).primal, batch.primal[i]) < 1e-8


@pytest.mark.slow
def test_failures_are_reported():
    Q, c, A, b, G, h = PROGRAM
    grad_c = lambda *data, **kw: jax.grad(
        lambda c: jnp.sum(bx.solve_qp(data[0], c, *data[2:], **kw).primal)
    )(data[1])
    # NaN data: every number NaN.
    nan = solve(Q, c.at[0].set(jnp.nan), A, b, G, h)
    assert nan.result == bx.RESULTS.nonfinite and jnp.all(jnp.isnan(nan.primal))
    # A solve cut short: the last iterate, flagged; its derivative NaN.
    short = solve(Q, c, A, b, G, h, max_steps=3)
    assert short.result == bx.RESULTS.max_steps_reached
    assert jnp.all(jnp.isnan(grad_c(Q, c, A, b, G, h, max_steps=3)))
    with pytest.raises(Exception, match="max_steps"):
        solve(Q, c, A, b, G, h, max_steps=3, throw=True)
    # Infeasible: x₀ <= -1 and -x₀ <= -1.
    e0 = jnp.zeros((2, 6)).at[0, 0].set(1.0).at[1, 0].set(-1.0)
    infeasible = solve(Q, c, None, None, e0, jnp.asarray([-1.0, -1.0]))
    assert infeasible.result == bx.RESULTS.primal_infeasible
    assert jnp.all(jnp.isnan(infeasible.primal)) and jnp.all(jnp.isnan(infeasible.dual_ineq))
    # Unbounded: min -x₀ with x₀ >= 0 and nothing else.
    unbounded = solve(
        jnp.zeros((2, 2)), jnp.asarray([-1.0, 0.0]), None, None, -jnp.eye(2), jnp.zeros(2)
    )
    assert unbounded.result == bx.RESULTS.dual_infeasible
    assert jnp.all(jnp.isnan(unbounded.primal))


@pytest.mark.slow
def test_weakly_active_constraint_is_reported():
    """min ½‖x − θ‖² s.t. x₀ <= θ₀: the constraint holds with equality and μ = 0."""
    theta = jnp.asarray([0.4, -1.0])
    G, h = jnp.asarray([[1.0, 0.0]]), theta[:1]
    sol = solve(jnp.eye(2), -theta, None, None, G, h)
    assert sol.result == bx.RESULTS.degenerate_complementarity
    assert relerr(sol.primal, theta) < 1e-8  # the solution is right; its derivative is not
    grad = jax.grad(lambda t: jnp.sum(bx.solve_qp(jnp.eye(2), -t, None, None, G, h).primal))
    assert jnp.all(jnp.isnan(grad(theta)))
    loud = lambda t: jnp.sum(bx.solve_qp(jnp.eye(2), -t, None, None, G, h, throw=True).primal)
    with pytest.raises(Exception, match="weakly active"):
        jax.grad(loud)(theta)


def test_bad_programs_are_refused_at_trace_time():
    Q, c, A, b, G, h = PROGRAM
    with pytest.raises(ValueError, match="`Q` must have shape"):
        bx.solve_qp(Q[:3], c)
    with pytest.raises(ValueError, match="both `A` and `b`"):
        bx.solve_qp(Q, c, A)
    with pytest.raises(ValueError, match="`h` must have shape"):
        bx.solve_qp(Q, c, None, None, G, h[:2])
    with pytest.raises(TypeError, match="`c` must be a floating-point"):
        bx.solve_qp(Q, np.arange(6))
    with pytest.raises(ValueError, match="relaxation"):
        bx.solve_qp(Q, c, relaxation=2.0)


# -- jaxopt's examples/constrained ---------------------------------------------------------------


def svm_data():
    """jaxopt's `binary_kernel_svm_with_intercept.py` data: 30 normalised examples, 5
    features, labels in {-1, 1}."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.make_classification(n_samples=30, n_features=5, n_classes=2, random_state=0)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    return jnp.asarray(X), jnp.asarray(y * 2.0 - 1)


def svm_program(X, y, C):
    """The dual of the binary kernel SVM with intercept: min ½βᵀKβ − yᵀβ s.t. Σβ = 0 and
    β between min(yC, 0) and max(yC, 0)."""
    n = X.shape[0]
    lower, upper = jnp.minimum(y * C, 0.0), jnp.maximum(y * C, 0.0)
    G = jnp.concatenate([jnp.eye(n), -jnp.eye(n)])
    return X @ X.T, -y, jnp.ones((1, n)), jnp.zeros(1), G, jnp.concatenate([upper, -lower])


@pytest.mark.slow
def test_binary_kernel_svm_with_intercept():
    """jaxopt's example, solved as a QP: the dual coefficients against jaxopt's `BoxOSQP` and
    scikit-learn's SVC on the same data; their derivative with respect to C and to the data
    against jaxopt's implicit derivative and the active-set closed form's central
    differences."""
    svm = pytest.importorskip("sklearn.svm")
    X, y = svm_data()
    C = jnp.asarray(2.0)
    sol = jax.jit(lambda X, C: bx.solve_qp(*svm_program(X, y, C)))(X, C)
    assert sol.result == bx.RESULTS.successful
    n = X.shape[0]

    def box_osqp(X, C):
        with standard():
            solver = jaxopt.BoxOSQP(
                tol=1e-10,
                maxiter=50_000,
                implicit_diff_solve=functools.partial(linear_solve.solve_normal_cg, tol=1e-12),
            )
            lower = jnp.concatenate([jnp.minimum(y * C, 0.0), jnp.zeros(1)])
            upper = jnp.concatenate([jnp.maximum(y * C, 0.0), jnp.zeros(1)])
            A = jnp.concatenate([jnp.eye(n), jnp.ones((1, n))])
            return solver.run(params_obj=(X @ X.T, -y), params_eq=A, params_ineq=(lower, upper))

    assert relerr(sol.primal, box_osqp(X, C).params.primal[0]) < 1e-7
    K = np.asarray(X @ X.T)
    svc = svm.SVC(kernel="precomputed", C=2.0, tol=1e-10).fit(K, np.asarray(y))
    beta = np.zeros(n)
    beta[svc.support_] = svc.dual_coef_[0]
    assert relerr(sol.primal, beta) < 1e-6

    weights = jnp.asarray(np.random.default_rng(3).normal(size=n))
    ours = jax.jit(
        jax.grad(lambda X, C: weights @ bx.solve_qp(*svm_program(X, y, C)).primal, (0, 1))
    )
    theirs = jax.jit(jax.grad(lambda X, C: weights @ box_osqp(X, C).params.primal[0], (0, 1)))
    grads = ours(X, C)
    assert relerr(grads, theirs(X, C)) < 1e-6
    active = np.flatnonzero(np.asarray(sol.dual_ineq) > 1e-6)
    dX = jnp.asarray(np.random.default_rng(4).normal(size=X.shape))
    eps = 1e-6
    closed = lambda s: (
        weights @ active_set_solution(*svm_program(X + s * eps * dX, y, C + s * eps), active)[0]
    )
    difference = (closed(1.0) - closed(-1.0)) / (2 * eps)
    directional = jnp.vdot(grads[0], dX) + grads[1]
    # The derivative is taken at ADMM's solution, accurate to about 1e-9.
    assert abs(directional - difference) <= 1e-6 * abs(difference)


def multiclass_svm_program(X, Y, l2reg):
    """The dual of the Crammer-Singer multiclass linear SVM (jaxopt's
    `multiclass_linear_svm.py`), β ∈ Rⁿˣᵏ flattened by rows: min ½ vec(β)ᵀ(K ⊗ I)vec(β)/l2reg
    + cᵀvec(β) with c = −(1 − Y) − KY/l2reg, each row of β on the simplex."""
    n, k = Y.shape
    K = X @ X.T
    Q = jnp.kron(K, jnp.eye(k)) / l2reg
    c = (-(1.0 - Y) - K @ Y / l2reg).ravel()
    A = jnp.kron(jnp.eye(n), jnp.ones((1, k)))
    return Q, c, A, jnp.ones(n), -jnp.eye(n * k), jnp.zeros(n * k)


@pytest.mark.slow
def test_multiclass_linear_svm():
    """jaxopt's example on its data (20 examples, 5 features, 3 classes): the dual against
    jaxopt's `OSQP` with the example's matvecs; its derivative with respect to the data and
    the regularisation against the active-set closed form's central differences."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.make_classification(
        n_samples=20, n_features=5, n_informative=3, n_classes=3, random_state=0
    )
    X = jnp.asarray(X / np.linalg.norm(X, axis=1, keepdims=True))
    Y = jax.nn.one_hot(jnp.asarray(y), 3, dtype=X.dtype)
    l2reg = jnp.asarray(1.0)
    sol = jax.jit(lambda X, l2reg: bx.solve_qp(*multiclass_svm_program(X, Y, l2reg)))(X, l2reg)
    assert sol.result == bx.RESULTS.successful

    def matvec_Q(X, beta):
        return jnp.dot(X, jnp.dot(X.T, beta)) / l2reg

    with standard():
        osqp = jaxopt.OSQP(
            matvec_Q=matvec_Q,
            matvec_A=lambda _, beta: jnp.sum(beta, axis=-1),
            matvec_G=lambda _, beta: -beta,
            tol=1e-10,
            maxiter=50_000,
        )
        linear_part = -(1.0 - Y) - jnp.dot(X, jnp.dot(X.T, Y)) / l2reg
        ref = osqp.run(
            params_obj=(X, linear_part),
            params_eq=(None, jnp.ones(20)),
            params_ineq=(None, jnp.zeros_like(Y)),
        ).params
    assert relerr(sol.primal, ref.primal.ravel()) < 1e-7

    weights = jnp.asarray(np.random.default_rng(5).normal(size=60))
    scalar = lambda X, l2reg: weights @ bx.solve_qp(*multiclass_svm_program(X, Y, l2reg)).primal
    grads = jax.jit(jax.grad(scalar, (0, 1)))(X, l2reg)
    active = np.flatnonzero(np.asarray(sol.dual_ineq) > 1e-6)
    dX = jnp.asarray(np.random.default_rng(6).normal(size=X.shape))
    eps = 1e-6
    closed = lambda s: (
        weights
        @ active_set_solution(
            *multiclass_svm_program(X + s * eps * dX, Y, l2reg + s * eps), active
        )[0]
    )
    difference = (closed(1.0) - closed(-1.0)) / (2 * eps)
    directional = jnp.vdot(grads[0], dX) + grads[1]
    assert abs(directional - difference) <= 1e-6 * abs(difference)


@pytest.mark.slow
def test_nmf_non_negative_ridge_update():
    """jaxopt's NMF example alternates non-negative ridge regressions,
    min_{W >= 0} ½ mean((UW − X)²) + ½γ‖W‖² (jaxopt's `least_squares` with
    `prox_non_negative_ridge`). One update, one QP per column of W under `vmap`, on the
    example's data (absolute diabetes features, 10 components; 40 of the examples): against jaxopt's
    `BlockCoordinateDescent`, and its derivative with respect to U against the active-set
    closed form's central differences."""
    datasets = pytest.importorskip("sklearn.datasets")
    X = jnp.asarray(np.abs(datasets.load_diabetes(return_X_y=True)[0][:40]))
    rng = np.random.RandomState(0)
    U = jnp.asarray(rng.rand(40, 10))
    gamma = 1e-3
    N, F = X.shape

    def column_programs(U):
        Q = U.T @ U / (N * F) + gamma * jnp.eye(U.shape[1])
        k = U.shape[1]
        return Q, -(U.T @ X).T / (N * F), -jnp.eye(k), jnp.zeros(k)

    def update(U):
        Q, cs, G, h = column_programs(U)
        # The program's scale is 1e-3 and `tol` is absolute below scale 1: tighten it.
        sols = jax.vmap(lambda c: bx.solve_qp(Q, c, None, None, G, h, tol=1e-12))(cs)
        return sols.primal.T, sols

    W, sols = jax.jit(update)(U)
    assert np.all(np.asarray(sols.result._value) == bx.RESULTS.successful._value)
    with standard():
        bcd = jaxopt.BlockCoordinateDescent(
            fun=jaxopt.objective.least_squares,
            block_prox=jaxopt.prox.prox_non_negative_ridge,
            maxiter=20_000,
            tol=1e-12,
        )
        ref = bcd.run(init_params=jnp.zeros((10, F)), hyperparams_prox=gamma, data=(U, X)).params
    active = int(jnp.sum(sols.dual_ineq > 1e-9))
    assert 0 < active < W.size  # some coefficients at the constraint, some not

    weights = jnp.asarray(np.random.default_rng(7).normal(size=W.shape))
    grad = jax.jit(jax.grad(lambda U: jnp.sum(weights * update(U)[0])))(U)
    dU = jnp.asarray(np.random.default_rng(8).normal(size=U.shape))
    actives = [np.flatnonzero(np.asarray(m) > 1e-9) for m in sols.dual_ineq]
    eps = 1e-6

    def closed_columns(U, actives):
        Q, cs, G, h = column_programs(U)
        none = jnp.zeros((0, 10))
        return [
            active_set_solution(Q, c, none, jnp.zeros(0), G, h, active)[0]
            for c, active in zip(cs, actives)
        ]

    def closed(s):
        return jnp.sum(weights * jnp.stack(closed_columns(U + s * eps * dU, actives), axis=1))

    difference = (closed(1.0) - closed(-1.0)) / (2 * eps)
    assert abs(jnp.vdot(grad, dU) - difference) <= 1e-6 * abs(difference)
    exact = jnp.stack(closed_columns(U, actives), axis=1)
    assert relerr(W, exact) < 1e-8
    # jaxopt's coordinate descent stops at its `maxiter` further from the closed form.
    assert relerr(W, ref) < 1e-3 and relerr(ref, exact) > relerr(W, exact)
