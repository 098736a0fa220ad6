"""The outer-loop benchmark's contenders (`experiments/benchmarks/ho_loop.py`) end at the same
hyperparameters, on a tiny problem: the benchmark times them, this checks that what is timed is
the same loop. Counted, not timed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import relerr


pytest.importorskip("jaxopt")

from experiments.benchmarks import ho_loop  # noqa: E402
from experiments.benchmarks._problems import dense_reference  # noqa: E402


def test_the_loops_reach_the_same_hyperparameters():
    (X_train, y_train), (X_val, y_val) = ho_loop.synthetic(60, 40, 20)
    train = (jnp.asarray(X_train), jnp.asarray(y_train))
    val = (jnp.asarray(X_val), jnp.asarray(y_val))
    lam0 = jnp.asarray(np.log(1e-2) + np.random.default_rng(1).uniform(-1.0, 1.0, 20))
    num_steps = 20
    runs = {
        name: ho_loop.counted_run(name, num_steps, lam0, train, val)
        for name in ("jaxopt", "obvious", "warm", "best", "hoag", "mixed")
    }
    lams = {name: lam for name, (lam, _) in runs.items()}
    # Raises unless the validation losses at the final λ agree to `LOSS_RTOL`.
    ho_loop.check_same_result("tiny", lams, train, val)
    assert relerr(lams["obvious"], lams["jaxopt"]) <= 1e-6
    assert relerr(lams["warm"], lams["jaxopt"]) <= 1e-6
    # HOAG's looser early tolerances move the path a little.
    assert relerr(lams["best"], lams["jaxopt"]) <= 1e-4
    assert relerr(lams["mixed"], lams["best"]) <= 1e-4  # (c)'s tolerances, other solves
    assert relerr(lams["best"], lam0) > 1e-2  # the loop moved λ at all
    # (d) is (c) in one class, `bx.contrib.HOAG`: the same solves, step for step. It skips
    # only (c)'s diagnostic residual, one HVP and the info's loss evaluations per outer step.
    assert relerr(lams["hoag"], lams["best"]) <= 1e-12
    assert runs["hoag"][1]["inner_iters"] == runs["best"][1]["inner_iters"]
    assert runs["hoag"][1]["hvps"] == runs["best"][1]["hvps"] - num_steps
    # (e)'s float32 work is counted apart, and only (e) has any.
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
