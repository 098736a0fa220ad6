"""Data hyper-cleaning: the label corruption, the hypergradients of one hyper-step against
central finite differences, resuming, and (slow) the `--quick` run's targets."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _harness, hyper_cleaning as hc
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
@pytest.mark.slow
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
@pytest.mark.slow
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


TINY = ["--sizes", "50", "50", "50", "--inner-steps", "5", "--eval-every", "2", "--float64"]


def _spies(monkeypatch, fail_at=None):
    """Counts the hypergradient steps of each method; with `fail_at`, the implicit method's
    step `fail_at` is "killed"."""
    calls = {"unrolled_step": [], "implicit_step": []}
    for name in calls:

        def spy(*args, _f=getattr(hc, name), _calls=calls[name], _name=name):
            if _name == "implicit_step" and len(_calls) == fail_at:
                raise KeyboardInterrupt
            _calls.append(1)
            return _f(*args)

        monkeypatch.setattr(hc, name, spy)
    return calls


@needs_mnist
@pytest.mark.slow
def test_resume_runs_only_the_steps_left(tmp_path, monkeypatch):
    monkeypatch.setattr(hc, "RETRAIN_STEPS", 100)  # the reported retraining: not under test
    main = lambda out, *argv: hc.main([*TINY, "--out", str(tmp_path / out), *argv])
    whole = main("whole", "--hyper-steps", "6")
    with monkeypatch.context() as patch:
        calls = _spies(patch, fail_at=3)
        with pytest.raises(KeyboardInterrupt):
            main("cut", "--hyper-steps", "4")  # killed at the implicit method's step 3
    assert {k: len(v) for k, v in calls.items()} == {"unrolled_step": 4, "implicit_step": 3}
    calls = _spies(monkeypatch)
    resumed = main("cut", "--hyper-steps", "4", "--resume")
    assert {k: len(v) for k, v in calls.items()} == {"unrolled_step": 0, "implicit_step": 1}
    assert resumed["run"]["progress"]["implicit"] == {"from": 3, "to": 4}
    # More hyper-steps (allowed) continue both methods: 2 more steps each, and the run is the
    # one that had 6 steps from the start.
    for c in calls.values():
        c.clear()
    grown = main("cut", "--hyper-steps", "6", "--resume")
    assert {k: len(v) for k, v in calls.items()} == {"unrolled_step": 2, "implicit_step": 2}
    for method in hc.METHODS:
        np.testing.assert_array_equal(grown[method]["weights"], whole[method]["weights"])
        assert grown[method]["history"] == whole[method]["history"]


@needs_mnist
@pytest.mark.parametrize(
    "change, message",
    [
        (["--seed", "1"], "--seed: 0 in the saved run, 1 now"),
        (["--sizes", "60", "50", "50"], "--sizes: [50, 50, 50] in the saved run, [60, 50, 50] now"),
        (["--hyper-steps", "3"], "--hyper-steps: 4 in the saved run, 3 now"),
    ],
)
def test_resume_with_other_options_is_refused(tmp_path, change, message):
    config = {
        "quick": False,
        "seed": 0,
        "hyper_steps": 4,
        "inner_steps": 5,
        "lr": 0.1,
        "sizes": [50, 50, 50],
        "eval_every": 2,
        "checkpoint_every": 1,
        "float64": True,
    }
    (tmp_path / "run.json").write_text(json.dumps({"config": config}))  # fmt: skip
    args = [*TINY, "--hyper-steps", "4", "--out", str(tmp_path), "--resume"]
    with pytest.raises(_harness.RunError, match=re.escape(message)):
        hc.main([*args, *change])


@needs_mnist
@pytest.mark.slow
@pytest.mark.long  # minutes: `nox -s long`, not CI
def test_quick_run_meets_targets(tmp_path):
    results = hc.main(["--quick", "--out", str(tmp_path)])
    assert results["oracle_acc"] > results["baseline_acc"] + 0.1
    for method in hc.METHODS:
        r = results[method]
        assert r["f1"] >= 0.8
        assert r["gap_recovered"] >= 0.5
    assert (tmp_path / "hyper_cleaning.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "results.json").exists()
