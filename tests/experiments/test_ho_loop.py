"""The outer-loop benchmark's contenders (`experiments/benchmarks/ho_loop.py`) end at the same
hyperparameters, on a tiny problem: the benchmark times them, this checks that what is timed is
the same loop. Counted, not timed."""

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from helpers import relerr

import bilevax as bx


pytest.importorskip("jaxopt")

from experiments.benchmarks import ho_loop, krylov_recycling  # noqa: E402
from experiments.benchmarks._problems import dense_reference  # noqa: E402


CORE_LOOPS = ("jaxopt", "obvious", "warm", "best", "hoag")


# (e) and (f) add a third of the default run's time here; the slow session runs them.
@pytest.mark.parametrize(
    "contenders",
    [CORE_LOOPS, pytest.param((*CORE_LOOPS, "mixed", "shine"), marks=pytest.mark.slow)],
)
def test_the_loops_reach_the_same_hyperparameters(contenders):
    (X_train, y_train), (X_val, y_val) = ho_loop.synthetic(60, 40, 20)
    train = (jnp.asarray(X_train), jnp.asarray(y_train))
    val = (jnp.asarray(X_val), jnp.asarray(y_val))
    lam0 = jnp.asarray(np.log(1e-2) + np.random.default_rng(1).uniform(-1.0, 1.0, 20))
    num_steps = 20
    runs = {name: ho_loop.counted_run(name, num_steps, lam0, train, val) for name in contenders}
    lams = {name: lam for name, (lam, _) in runs.items()}
    # Raises unless the validation losses at the final λ agree to `LOSS_RTOL`.
    ho_loop.check_same_result("tiny", lams, train, val)
    assert relerr(lams["obvious"], lams["jaxopt"]) <= 1e-6
    assert relerr(lams["warm"], lams["jaxopt"]) <= 1e-6
    # HOAG's looser early tolerances move the path a little.
    assert relerr(lams["best"], lams["jaxopt"]) <= 1e-4
    if "mixed" in lams:
        assert relerr(lams["mixed"], lams["best"]) <= 1e-4  # (c)'s tolerances, other solves
        assert relerr(lams["shine"], lams["best"]) <= 1e-4  # (c)'s solves, other adjoint starts
    assert relerr(lams["best"], lam0) > 1e-2  # the loop moved λ at all
    # (d) is (c) in one class, `bx.contrib.HOAG`: the same solves, step for step. It skips
    # only (c)'s diagnostic residual, one HVP and the info's loss evaluations per outer step.
    assert relerr(lams["hoag"], lams["best"]) <= 1e-12
    assert runs["hoag"][1]["inner_iters"] == runs["best"][1]["inner_iters"]
    assert runs["hoag"][1]["hvps"] == runs["best"][1]["hvps"] - num_steps
    # (e)'s float32 work is counted apart, and only (e) has any.
    if "mixed" in runs:
        assert {"f32_loss_evals", "f32_hvps"} <= runs["mixed"][1].keys()
    assert all("f32_hvps" not in counts for name, (_, counts) in runs.items() if name != "mixed")
    for name, (_, counts) in runs.items():
        for key, count in counts.items():
            assert isinstance(count, int) and count > 0, (name, key)
        # At least one inner iteration and one linear-solve step per outer step; an L-BFGS
        # iteration evaluates the loss at least once, at most a line search's worth.
        assert counts["inner_iters"] >= num_steps, name
        assert counts["hvps"] >= num_steps, name
        evals = counts["loss_evals"] + counts.get("f32_loss_evals", 0)
        assert counts["inner_iters"] <= evals <= 20 * counts["inner_iters"], name
    # Warm starts of the solution and of the adjoint save work.
    assert runs["best"][1]["hvps"] <= runs["obvious"][1]["hvps"]
    assert runs["best"][1]["inner_iters"] <= runs["obvious"][1]["inner_iters"]
    # (b′) differs from (b) only in its start: fewer inner iterations (measured 405 against
    # 513), the same linear solves (368 HVPs each).
    assert runs["warm"][1]["inner_iters"] < runs["obvious"][1]["inner_iters"]
    # At d = 20, (c) resumes a dense BFGS across outer steps and preconditions the adjoint
    # with it: far fewer inner iterations and HVPs than jaxopt's warm-started L-BFGS
    # (measured 198 against 361, and 155 against 388).
    assert ho_loop._best_solver(20).__class__.__name__ == "BFGS"
    assert runs["best"][1]["inner_iters"] <= 0.75 * runs["jaxopt"][1]["inner_iters"]
    assert runs["best"][1]["hvps"] <= 0.6 * runs["jaxopt"][1]["hvps"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--contenders", "best", "jaxopt"], "the first must be jaxopt"),
        (["--outer-steps", "0"], "--outer-steps must be >= 1"),
        (["--problems", "mnist"], "invalid choice"),
    ],
)
def test_the_command_refuses_bad_options(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ho_loop.main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_time_to_target_times_a_prefix_of_the_loop():
    # The view times a loop compiled for k outer steps as the time to reach the k-th λ of the
    # full loop: that holds only if no loop depends on its own length (HOAG's schedule, say).
    (X_train, y_train), (X_val, y_val) = ho_loop.synthetic(60, 40, 20)
    train = (jnp.asarray(X_train), jnp.asarray(y_train))
    val = (jnp.asarray(X_val), jnp.asarray(y_val))
    lam0 = jnp.asarray(np.log(1e-2) + np.random.default_rng(1).uniform(-1.0, 1.0, 20))
    # (c)'s tolerances follow HOAG's schedule in the outer step: the loop most at risk.
    *_, lams = jax.jit(ho_loop.LOOPS["best"](6))(lam0, train, val)
    lam, *_ = jax.jit(ho_loop.LOOPS["best"](4))(lam0, train, val)
    assert relerr(lam, lams[3]) <= 1e-12
    losses = ho_loop.exact_losses(lams, train, val)
    # Each loss is the validation loss at an exactly solved inner problem.
    assert losses[-1] == pytest.approx(ho_loop.final_val_loss(lams[-1], train, val)[0], 1e-12)
    assert ho_loop.steps_to_target(losses, losses.min()) == int(np.argmin(losses)) + 1
    assert ho_loop.steps_to_target(losses, losses.min() - 1.0) is None


@pytest.mark.slow
@pytest.mark.parametrize("tol", [1e-4, 1e-8])
def test_the_mixed_precision_hypergradient_is_as_accurate_as_float64(tol):
    # (e) solves in float32 and refines in float64; its hypergradient must be as accurate as
    # (c)'s at the same tolerance: within ~tol of the exact one (a dense Hessian solve at an
    # inner solution from Newton's method), from a cold start and from a warm one.
    (X_train, y_train), (X_val, y_val) = ho_loop.synthetic(80, 40, 30)
    train = (jnp.asarray(X_train), jnp.asarray(y_train))
    val = (jnp.asarray(X_val), jnp.asarray(y_val))
    lam = jnp.asarray(np.log(1e-2) + np.random.default_rng(2).uniform(-1.0, 1.0, 30))
    w_star, _ = ho_loop.newton_cg(jnp.zeros(30), lam, train)
    value, exact = dense_reference(w_star, lam, train, val)
    carry = ho_loop.mixed_init(lam, train)
    mixed_hypergrad = jax.jit(ho_loop.mixed_hypergrad)
    for _ in range(2):  # the second call starts from the first's solution and adjoint
        got, hypergrad, carry, _ = mixed_hypergrad(lam, train, val, carry, tol)
        assert hypergrad.dtype == jnp.float64
        assert jnp.linalg.norm(hypergrad - exact) <= 20 * tol * max(1.0, jnp.linalg.norm(exact))
        assert abs(got - value) <= tol
    # Tighter than float32 alone could get: the float64 refinement did the rest.
    if tol < 1e-6:
        assert jnp.linalg.norm(hypergrad - exact) <= 1e-6 * jnp.linalg.norm(exact)


def _problem(n_train, n_val, d, strength, seed):
    (X_train, y_train), (X_val, y_val) = ho_loop.synthetic(n_train, n_val, d)
    train = (jnp.asarray(X_train), jnp.asarray(y_train))
    val = (jnp.asarray(X_val), jnp.asarray(y_val))
    lam = jnp.asarray(np.log(strength) + np.random.default_rng(seed).uniform(-1.0, 1.0, d))
    return lam, train, val


@pytest.mark.slow
def test_an_opa_pair_makes_shines_start_better_along_the_outer_gradient():
    # SHINE starts the adjoint at B⁻¹ ∇_w E, the inner L-BFGS's own inverse-Hessian model.
    # An OPA pair (e, He), e = B⁻¹ ∇_w E, is a secant pair: the updated model maps He to e
    # exactly. On this problem (d = 200 > n = 100, ten pairs) plain SHINE's start is worse
    # than zero (relative residual 1.3, measured); the pair cuts it to 0.31.
    lam, train, val = _problem(100, 50, 200, 1e-2, 2)
    solver = optx.LBFGS(rtol=1e-8, atol=1e-8, history_length=10)
    sol = bx.inner_solve(ho_loop.inner_loss, jnp.zeros(200), lam, train, solver=solver, tol=1e-8)
    assert sol.result == bx.RESULTS.successful
    w = sol.params
    outer_grad = jax.grad(ho_loop.outer_loss)(w, lam, val)
    hvp = jax.linearize(lambda u: jax.grad(ho_loop.inner_loss)(u, lam, train), w)[1]
    residual = lambda v: jnp.linalg.norm(hvp(v) - outer_grad) / jnp.linalg.norm(outer_grad)
    state = ho_loop.with_opa_pair(solver, sol.state, w, hvp, outer_grad)
    e = ho_loop.inverse_hessian_mv(solver, sol.state, w, outer_grad)
    assert relerr(ho_loop.inverse_hessian_mv(solver, state, w, hvp(e)), e) <= 1e-10  # secant
    plain = residual(e)
    opa = residual(ho_loop.inverse_hessian_mv(solver, state, w, outer_grad))
    assert plain > 1.0
    assert opa <= 0.5 * plain


@pytest.mark.slow
@pytest.mark.parametrize("d", [30, 600])  # the dense BFGS of (c), and L-BFGS beyond 500
def test_shines_hypergradient_is_as_accurate_as_the_exact_one(d):
    # (f) checks SHINE's start and refines it by CG to (c)'s tolerance: its hypergradient must
    # be within ~tol of the exact one (a dense Hessian solve at Newton's inner solution), cold
    # and then warm, with and without the OPA pair; the inexact variant must not be.
    lam, train, val = _problem(80, 40, d, 1e-2, 2)
    w_star, _ = ho_loop.newton_cg(jnp.zeros(d), lam, train)
    value, exact = dense_reference(w_star, lam, train, val)
    state0 = bx.inner_solve(
        ho_loop.inner_loss, jnp.zeros(d), lam, train, solver=ho_loop._best_solver(d), max_steps=0
    ).state
    tol = 1e-8
    shine = jax.jit(ho_loop.shine_hypergrad, static_argnames=("opa", "inexact"))
    for opa in (True, False):
        carry = (jnp.zeros(d), jnp.zeros(d), state0)
        for _ in range(2):  # the second call resumes the first's solution and state
            got, hypergrad, carry, _ = shine(lam, train, val, carry, tol, opa=opa)
            assert jnp.linalg.norm(hypergrad - exact) <= 20 * tol * max(1.0, jnp.linalg.norm(exact))
            # The inner solve stops at ‖∇_w L‖ ≤ tol, within tol/μ of w* (measured 1.3e-8).
            assert abs(got - value) <= 10 * tol
    carry = (jnp.zeros(d), jnp.zeros(d), state0)
    _, inexact, *_ = shine(lam, train, val, carry, tol, inexact=True)
    assert jnp.linalg.norm(inexact - exact) > 1e-4 * jnp.linalg.norm(exact)


def test_deflated_cg_pays_where_small_eigenvalues_stand_apart_and_not_elsewhere():
    # The Krylov-recycling bound (`krylov_recycling.py`) deflates exact eigenvectors; it must
    # solve the system, and show a saving where there is one to show: five eigenvalues 1,000
    # times below a cluster halve CG's products (measured 38 → 19, deflation's 6 included),
    # and an evenly spread spectrum, like the d = 2,000 problem's, gives nothing (36 → 38).
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    b = rng.standard_normal(200)
    separated = np.concatenate([np.geomspace(1e-3, 2e-3, 5), np.linspace(1.0, 2.0, 195)])
    for eigenvalues, saves in ((separated, True), (np.linspace(1.0, 12.0, 200), False)):
        matrix = (basis * eigenvalues) @ basis.T
        exact = np.linalg.solve(matrix, b)
        x_plain, plain = krylov_recycling.deflated_cg(matrix, b, np.zeros(200), None, 1e-8)
        x_deflated, deflated = krylov_recycling.deflated_cg(
            matrix, b, np.zeros(200), basis[:, :5], 1e-8
        )
        assert relerr(x_plain, exact) <= 1e-8 and relerr(x_deflated, exact) <= 1e-8
        if saves:
            assert deflated <= 0.6 * plain
        else:
            assert deflated >= plain
