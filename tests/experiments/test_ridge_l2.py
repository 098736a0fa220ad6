"""The ridge demo: hypergradients against the closed form, the optimum reached, the outputs
written, resuming a killed or finished run (counting the inner trainings it executes), refusing
a resume with other options, and the demo's default output directory."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _harness, ridge_l2
from experiments.problems import relerr


BUDGET = 30


@pytest.fixture(scope="module")
def problem():
    return ridge_l2.load(seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ridge_l2")
    return out, ridge_l2.main(["--out", str(out), "--budget", str(BUDGET)])


def _numpy_hypergrad(lam, problem):
    """dCV/dλ = mean over folds of −e^λ ⊙ w*_k ⊙ A_k⁻¹ ∇_w E_k, written out in NumPy, one fold
    at a time: independent of JAX's autodiff and of the vmap over folds."""
    (X, y), (Xv, yv) = [tuple(map(np.asarray, d)) for d in (problem.fold_train, problem.fold_val)]
    folds = []
    for Xk, yk, Xvk, yvk in zip(X, y, Xv, yv):
        A = Xk.T @ Xk / len(yk) + np.diag(np.exp(lam))
        w = np.linalg.solve(A, Xk.T @ yk / len(yk))
        folds.append(-np.exp(lam) * w * np.linalg.solve(A, 2 * Xvk.T @ (Xvk @ w - yvk) / len(yvk)))
    return np.mean(folds, axis=0)


def test_folds_partition_the_data(problem):
    # Every point is held out exactly once, and never trained on in its own fold.
    X, _ = map(np.asarray, problem.cv)
    held_out = np.asarray(problem.fold_val[0]).reshape(-1, X.shape[1])
    np.testing.assert_array_equal(np.sort(held_out, axis=0), np.sort(X, axis=0))
    for train, val in zip(np.asarray(problem.fold_train[0]), np.asarray(problem.fold_val[0])):
        assert len(train) + len(val) == len(X)
        assert not (train[:, None, :] == val[None, :, :]).all(-1).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hypergradients_match_closed_form(problem, seed):
    d = problem.cv[0].shape[1]
    lam = np.random.default_rng(seed).uniform(ridge_l2.LOWER, ridge_l2.UPPER, d)
    reference = _numpy_hypergrad(lam, problem)
    lam, w0 = jnp.asarray(lam), jnp.zeros((problem.folds, d), jnp.float64)
    _, implicit, _ = ridge_l2.implicit_hypergrad(lam, w0, problem)
    _, unrolled, _ = ridge_l2.unrolled_hypergrad(lam, w0, problem, 2000)
    _, truncated, _ = ridge_l2.unrolled_hypergrad(lam, w0, problem, 20)
    assert relerr(implicit, reference) < 1e-6
    assert relerr(unrolled, reference) < 1e-6
    # Few steps differentiate an early-stopped model, not w*: the check above is not vacuous.
    assert relerr(truncated, reference) > 1e-3


def test_run_hypergradients_and_optimum(run):
    _, results = run
    optimum = results["closed_form"]["cv_loss"]
    for name in ("hgd_implicit", "hgd_unrolled"):
        r = results[name]
        assert r["hypergrad_relerr_initial"] < 1e-8
        assert r["hypergrad_relerr_max"] < 1e-6
        assert r["cv_loss"] <= 1.01 * optimum
        # The same budget of inner trainings buys the search methods less.
        for search in ("grid", "random", "tpe"):
            assert r["cv_loss"] < results[search]["cv_loss"]
    # The closed-form optimum is a true optimum over the box: no method goes below it.
    for name in ridge_l2.METHODS:
        assert results[name]["cv_loss"] >= optimum - 1e-9


def test_outputs(run):
    out, _ = run
    results = json.loads((out / "results.json").read_text())
    for name in (*ridge_l2.METHODS, "closed_form"):
        assert {"cv_loss", "test_loss", "inner_trainings"} <= results[name].keys()
        assert np.isfinite(results[name]["test_loss"])
    for name in ridge_l2.METHODS:
        assert results[name]["cross_validations"] == BUDGET
        assert results[name]["inner_trainings"] == 5 * BUDGET  # K = 5 folds
        assert len(results[name]["log_lam"]) == 10  # log strengths, named as such
    png = (out / "ridge_l2.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert results["run"]["config"]["budget"] == BUDGET


def _spies(monkeypatch):
    """Counts the inner trainings of each kind: the steps a run actually executes."""
    calls = {}
    for name in ("implicit_hypergrad", "unrolled_hypergrad", "_train_and_validate"):
        calls[name] = []

        def spy(*args, _f=getattr(ridge_l2, name), _calls=calls[name]):
            _calls.append(1)
            return _f(*args)

        monkeypatch.setattr(ridge_l2, name, spy)
    return calls


def test_resume_of_a_finished_run_trains_nothing(run, monkeypatch):
    out, results = run
    calls = _spies(monkeypatch)
    again = ridge_l2.main(["--out", str(out), "--budget", str(BUDGET), "--resume"])
    assert {name: len(c) for name, c in calls.items()} == dict.fromkeys(calls, 0)
    assert all(p["from"] == p["to"] == BUDGET for p in again["run"]["progress"].values())
    for name in ridge_l2.METHODS:
        assert again[name]["cv_loss"] == results[name]["cv_loss"]
        assert again[name]["seconds"] == results[name]["seconds"]  # the time it took then


SMALL = ["--budget", "8", "--unrolled-steps", "50"]


@pytest.mark.slow
def test_resume_after_kill_runs_only_the_rest(tmp_path, monkeypatch):
    whole = ridge_l2.main([*SMALL, "--out", str(tmp_path / "whole")])
    implicit = ridge_l2.implicit_hypergrad
    done = []

    def killed_at_step_5(*args):
        if len(done) == 5:
            raise KeyboardInterrupt  # the 6th implicit step: 5 are checkpointed
        done.append(1)
        return implicit(*args)

    monkeypatch.setattr(ridge_l2, "implicit_hypergrad", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        ridge_l2.main([*SMALL, "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    calls = _spies(monkeypatch)
    resumed = ridge_l2.main([*SMALL, "--out", str(tmp_path / "cut"), "--resume"])
    # The 3 implicit steps left, then every other method from its start: nothing twice.
    assert {name: len(c) for name, c in calls.items()} == {
        "implicit_hypergrad": 3,
        "unrolled_hypergrad": 8,
        "_train_and_validate": 3 * 8,
    }
    assert resumed["run"]["progress"]["hgd_implicit"] == {"from": 5, "to": 8}
    for name in ridge_l2.METHODS:
        assert resumed[name]["cv_loss"] == whole[name]["cv_loss"]
        np.testing.assert_array_equal(resumed[name]["log_lam"], whole[name]["log_lam"])
        np.testing.assert_array_equal(resumed[name]["best_so_far"], whole[name]["best_so_far"])
    np.testing.assert_array_equal(
        resumed["hgd_implicit"]["final_log_lam"], whole["hgd_implicit"]["final_log_lam"]
    )


SAVED = {"quick": False, "seed": 0, "budget": 8, "folds": 5, "unrolled_steps": 50, "lr": 0.5}


@pytest.mark.parametrize(
    "change, message",
    [
        (["--lr", "0.1"], "--lr: 0.5 in the saved run, 0.1 now"),
        (["--seed", "1"], "--seed: 0 in the saved run, 1 now"),
        (["--budget", "4"], "--budget: 8 in the saved run, 4 now"),
        (["--quick"], "--quick: false in the saved run, true now"),
        (["--folds", "4"], "--folds: 5 in the saved run, 4 now"),
    ],
)
def test_resume_with_other_options_is_refused(tmp_path, change, message):
    (tmp_path / "run.json").write_text(json.dumps({"config": SAVED}))
    with pytest.raises(_harness.RunError, match=re.escape(message)) as error:
        ridge_l2.main([*SMALL, *change, "--out", str(tmp_path), "--resume"])
    assert str(error.value).count(" in the saved run") == 1  # only the option that differs


@pytest.mark.parametrize("folds", [1, 7])
def test_folds_that_do_not_divide_the_data_are_refused(tmp_path, folds):
    with pytest.raises(ValueError, match=f"`folds` must be at least 2 and divide 340, got {folds}"):
        ridge_l2.main(["--folds", str(folds), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_demo_twice_writes_two_runs(tmp_path, monkeypatch):
    # `nox -s demo` (no --out) run twice: two new directories, nothing refused or overwritten.
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        ridge_l2.main(["--budget", "2", "--unrolled-steps", "50"])
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("ridge_l2-") for r in runs)
    assert all((r / "results.json").is_file() and (r / "ridge_l2.png").is_file() for r in runs)
    with pytest.raises(_harness.RunError, match="already holds a run"):
        ridge_l2.main(["--budget", "2", "--unrolled-steps", "50", "--out", str(runs[0])])


@pytest.mark.slow
def test_full_run_reaches_the_closed_form_optimum(tmp_path):
    results = ridge_l2.main(["--out", str(tmp_path), "--seed", "0"])
    optimum = results["closed_form"]["cv_loss"]
    for name in ("hgd_implicit", "hgd_unrolled"):
        assert results[name]["cv_loss"] <= (1 + 1e-3) * optimum
        for search in ("grid", "random", "tpe"):
            assert results[name]["cv_loss"] < results[search]["cv_loss"]
