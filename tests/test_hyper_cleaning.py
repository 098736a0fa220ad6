"""Data hyper-cleaning: the label corruption, the hypergradients of one hyper-step against
central finite differences, resuming, and (slow) the `--quick` run's targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _common, hyper_cleaning as hc
from experiments.data import load_mnist


def _have_mnist() -> bool:
    try:
        load_mnist(None, split="test")
    except (FileNotFoundError, ValueError):
        return False
    return True


needs_mnist = pytest.mark.skipif(
    not _have_mnist(),
    reason="MNIST (t10k files) not found in $BILEVAX_DATA or ../shared/data",
)


@pytest.mark.parametrize("n", [4000, 51])
def test_corruption_changes_exactly_half_to_other_classes(n):
    labels = np.random.default_rng(0).integers(0, 10, n).astype(np.int32)
    noisy, corrupted = hc.corrupt_labels(labels, 0.5, seed=3)
    assert noisy.dtype == np.int32 and noisy.min() >= 0 and noisy.max() <= 9
    assert corrupted.sum() == round(0.5 * n)
    # Changed exactly where flagged, and never to the same class.
    np.testing.assert_array_equal(noisy != labels, corrupted)
    if n == 4000:
        # Uniform over the nine other classes: each shift 1..9 about 2000/9 ≈ 222 times.
        shifts = (noisy - labels)[corrupted] % 10
        counts = np.bincount(shifts, minlength=10)
        assert counts[0] == 0
        assert counts[1:].min() > 150 and counts[1:].max() < 300
    # Deterministic in the seed.
    np.testing.assert_array_equal(hc.corrupt_labels(labels, 0.5, seed=3)[0], noisy)


@pytest.fixture(scope="module")
def tiny():
    """50 training / 50 validation / 50 test digits in float64."""
    return hc.load(None, seed=0, sizes=(50, 50, 50), dtype=jnp.float64)


def _directions(n, count=3):
    return jax.random.normal(jax.random.key(1), (count, n), jnp.float64)


def _central(f, u, d, eps=1e-5):
    return (f(u + eps * d) - f(u - eps * d)) / (2 * eps)


@needs_mnist
def test_problem_is_corrupted_as_stated(tiny):
    problem = hc.load(None, seed=0)
    y, clean, corrupted = (
        np.asarray(problem.train[1]),
        np.asarray(problem.clean_train_labels),
        np.asarray(problem.corrupted).astype(bool),
    )
    assert len(y) == 4000 and corrupted.sum() == 2000
    np.testing.assert_array_equal(y != clean, corrupted)
    assert problem.val[0].shape == (2000, 784) and problem.test[0].shape == (4000, 784)
    assert 0.0 <= float(problem.train[0].min()) and float(problem.train[0].max()) <= 1.0


@needs_mnist
def test_unrolled_hypergrad_matches_finite_differences(tiny):
    n, T = tiny.train[0].shape[0], 30
    u = jax.random.normal(jax.random.key(0), (n,), jnp.float64)
    _, hgrad = hc.unrolled_step(u, tiny, T)

    def objective(u):
        params = hc.train(jax.nn.sigmoid(u), tiny, T)[0]  # exactly T steps: tol = 0
        return hc.outer_loss(params, u, tiny.val)

    for d in _directions(n):
        fd = _central(objective, u, d)
        assert jnp.abs(jnp.dot(hgrad, d) - fd) <= 1e-7 * jnp.abs(fd) + 1e-10


@needs_mnist
def test_implicit_hypergrad_matches_finite_differences(tiny):
    n = tiny.train[0].shape[0]
    u = jax.random.normal(jax.random.key(0), (n,), jnp.float64)
    solve = lambda u: hc.train(jax.nn.sigmoid(u), tiny, 20_000, 1e-11)
    w_star, _, grad_norm = solve(u)
    assert grad_norm <= 1e-11
    _, hgrad, _, _ = hc.implicit_step(u, w_star, tiny, 10, 1e-11, 1e-12)

    def objective(u):
        return hc.outer_loss(solve(u)[0], u, tiny.val)

    for d in _directions(n):
        fd = _central(objective, u, d)
        assert jnp.abs(jnp.dot(hgrad, d) - fd) <= 1e-6 * jnp.abs(fd) + 1e-10
    # The two methods differ here: 30 steps are far from w*, so the checks are not the same.
    _, unrolled = hc.unrolled_step(u, tiny, 30)
    assert jnp.linalg.norm(unrolled - hgrad) > 1e-2 * jnp.linalg.norm(hgrad)


@needs_mnist
@pytest.mark.parametrize("method", ["unrolled", "implicit"])
def test_resume_continues_the_same_trajectory(tiny, tmp_path, method):
    run = lambda steps, resume: hc.hyper_clean(
        method,
        tiny,
        steps,
        _common.Checkpoints(tmp_path / ("a" if resume is not None else "b"), bool(resume)),
        learning_rate=0.1,
        num_steps=10,
        eval_every=2,
    )
    run(3, False)  # "killed" after 3 steps: its checkpoint holds them
    resumed = run(6, True)
    straight = run(6, None)
    np.testing.assert_array_equal(resumed["u"], straight["u"])
    assert resumed["val_loss"] == straight["val_loss"]
    assert len(resumed["val_loss"]) == 6


@needs_mnist
@pytest.mark.slow
def test_quick_run_meets_targets(tmp_path):
    results = hc.main(["--quick", "--out", str(tmp_path)])
    assert results["oracle_acc"] > results["baseline_acc"] + 0.1
    for method in hc.METHODS:
        r = results[method]
        assert r["f1"] >= 0.8
        assert r["gap_recovered"] >= 0.5
    assert (tmp_path / "hyper_cleaning.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "results.json").exists()
