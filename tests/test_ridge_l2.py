"""The ridge demo: hypergradients against the closed form, the optimum reached, the outputs
written, and resuming a killed run."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _common, ridge_l2


BUDGET = 30


@pytest.fixture(scope="module")
def problem():
    return ridge_l2.load(seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ridge_l2")
    return out, ridge_l2.main(["--out", str(out), "--budget", str(BUDGET)])


def _numpy_hypergrad(lam, problem):
    """dE/dλ = −e^λ ⊙ w* ⊙ A⁻¹ ∇_w E, written out in NumPy: independent of JAX's autodiff."""
    (X, y), (Xv, yv) = [tuple(map(np.asarray, d)) for d in (problem.train, problem.val)]
    A = X.T @ X / len(y) + np.diag(np.exp(lam))
    w = np.linalg.solve(A, X.T @ y / len(y))
    return -np.exp(lam) * w * np.linalg.solve(A, 2 * Xv.T @ (Xv @ w - yv) / len(yv))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hypergradients_match_closed_form(problem, seed):
    d = problem.train[0].shape[1]
    lam = np.random.default_rng(seed).uniform(ridge_l2.LOWER, ridge_l2.UPPER, d)
    reference = _numpy_hypergrad(lam, problem)
    lam, w0 = jnp.asarray(lam), jnp.zeros(d, jnp.float64)
    _, implicit, _ = ridge_l2.implicit_hypergrad(lam, w0, problem)
    _, unrolled, _ = ridge_l2.unrolled_hypergrad(lam, w0, problem, 2000)
    _, truncated, _ = ridge_l2.unrolled_hypergrad(lam, w0, problem, 20)
    relerr = lambda g: np.linalg.norm(np.asarray(g) - reference) / np.linalg.norm(reference)
    assert relerr(implicit) < 1e-6
    assert relerr(unrolled) < 1e-6
    # Few steps differentiate an early-stopped model, not w*: the check above is not vacuous.
    assert relerr(truncated) > 1e-3


def test_run_hypergradients_and_optimum(run):
    _, results = run
    optimum = results["closed_form"]["val_loss"]
    for name in ("hgd_implicit", "hgd_unrolled"):
        r = results[name]
        assert r["hypergrad_relerr_initial"] < 1e-8
        assert r["hypergrad_relerr_max"] < 1e-6
        assert r["val_loss"] <= 1.01 * optimum
        # The same budget of inner trainings buys the search methods less.
        for search in ("grid", "random", "tpe"):
            assert r["val_loss"] < results[search]["val_loss"]
    # The closed-form optimum is a true optimum over the box: no method goes below it.
    for name in ridge_l2.METHODS:
        assert results[name]["val_loss"] >= optimum - 1e-9


def test_outputs(run):
    out, _ = run
    results = json.loads((out / "results.json").read_text())
    for name in (*ridge_l2.METHODS, "closed_form"):
        assert {"val_loss", "test_loss", "inner_trainings"} <= results[name].keys()
        assert np.isfinite(results[name]["test_loss"])
    for name in ridge_l2.METHODS:
        assert results[name]["inner_trainings"] == BUDGET
    png = (out / "ridge_l2.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_resume_after_kill(problem, tmp_path, monkeypatch):
    steps, killed_after = 12, 5
    whole = ridge_l2.hypergradient_descent(
        "implicit", problem, steps, _common.Checkpoints(tmp_path / "whole", resume=False)
    )

    save = _common.Checkpoints.save
    count = 0

    def save_then_die(self, name, state):
        nonlocal count
        save(self, name, state)
        count += 1
        if count == killed_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(_common.Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ridge_l2.hypergradient_descent(
            "implicit", problem, steps, _common.Checkpoints(tmp_path / "cut", resume=False)
        )
    monkeypatch.undo()
    resumed = ridge_l2.hypergradient_descent(
        "implicit", problem, steps, _common.Checkpoints(tmp_path / "cut", resume=True)
    )
    np.testing.assert_array_equal(resumed["final_lam"], whole["final_lam"])
    assert resumed["val_loss"] == whole["val_loss"]
    assert len(resumed["lam"]) == steps


def test_main_resume_reuses_finished_methods(run):
    out, results = run
    again = ridge_l2.main(["--out", str(out), "--budget", str(BUDGET), "--resume"])
    for name in ridge_l2.METHODS:
        assert again[name]["val_loss"] == results[name]["val_loss"]
        assert again[name]["seconds"] < 1.0


def test_data_dir_order_and_error(tmp_path, monkeypatch):
    args = _common.parser("x", "").parse_args(["--data-dir", str(tmp_path)])
    monkeypatch.setenv("BILEVAX_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(_common, "DEFAULT_DATA", tmp_path / "default")
    assert _common.data_dir(args) == tmp_path
    args.data_dir = None
    (tmp_path / "env").mkdir()
    assert _common.data_dir(args) == tmp_path / "env"
    with pytest.raises(FileNotFoundError, match="example.org"):
        _common.data_dir(args, "mnist", download="https://example.org/mnist")


def test_write_results_converts_arrays(tmp_path):
    path = _common.write_results(
        tmp_path, {"a": jnp.asarray(1.5), "b": np.float32(2.0), "c": np.arange(3)}
    )
    assert json.loads(path.read_text()) == {"a": 1.5, "b": 2.0, "c": [0, 1, 2]}


@pytest.mark.slow
def test_full_run_reaches_the_closed_form_optimum(tmp_path):
    results = ridge_l2.main(["--out", str(tmp_path), "--seed", "0"])
    optimum = results["closed_form"]["val_loss"]
    for name in ("hgd_implicit", "hgd_unrolled"):
        assert results[name]["val_loss"] <= (1 + 1e-3) * optimum
        for search in ("grid", "random", "tpe"):
            assert results[name]["val_loss"] < results[search]["val_loss"]
