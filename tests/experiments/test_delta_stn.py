"""The Δ-STN experiment: the learned hyperparameters against the closed forms on diabetes,
the outputs written, and resuming a killed run (counting the epochs and trials it runs)."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevax.nn as bnn
from experiments import _checkpoint, _harness
from experiments.delta_stn import _baselines, stability
from experiments.delta_stn.__main__ import main
from experiments.delta_stn._loop import applied_values
from experiments.delta_stn._tasks import (
    RIDGE_VAL_GAP,
    dropout_response_jacobian,
    dropout_weights,
    make_task,
    ridge_closed_form,
    ridge_val_gap,
)


@pytest.fixture(scope="module")
def ridge(tmp_path_factory):
    out = tmp_path_factory.mktemp("ridge")
    return out, main(["ridge", "--quick", "--out", str(out), "--methods", "delta", "centred"])


@pytest.mark.slow
def test_ridge_lands_on_the_closed_form_optimum(ridge):
    out, results = ridge
    for method in ("delta", "centred"):
        (run,) = results[method]["seeds"]
        # |log λ − log λ*| with λ* from the exact ridge solution's validation loss.
        assert run["log_l2_error"] < 0.1, (method, run["hparams"])
        assert run["final_val_loss"] <= 1.005 * results["closed_form"]["val_loss"]
    written = json.loads((out / "results.json").read_text())
    for method in ("delta", "centred"):
        assert {"val_loss", "test_loss", "hparams"} <= set(written[method])
    assert (out / "delta_stn_ridge.png").stat().st_size > 0


@pytest.mark.slow
def test_dropout_regression_within_two_percent_of_closed_form(tmp_path):
    results = main(["dropout-regression", "--quick", "--out", str(tmp_path), "--methods", "delta"])
    (run,) = results["delta"]["seeds"]
    best = results["closed_form"]["val_loss"]
    # The trained network's eval-mode validation loss, and that of the exact minimiser of the
    # expected dropout loss at the learned rates, against the best over all rates.
    assert run["final_val_loss"] <= 1.02 * best, (run["final_val_loss"], best)
    assert run["exact_val_loss"] <= 1.02 * best
    # The learned rates moved from their start (0.1 everywhere) towards the optimum's.
    assert np.ptp(run["hparams"]) > 0.05


@pytest.mark.slow
def test_resume_continues_a_killed_run(tmp_path, monkeypatch):
    args = ["ridge", "--quick", "--epochs", "4", "--methods", "delta", "random", "tpe"]
    fresh = main([*args, "--out", str(tmp_path / "fresh")])
    saves = []
    original = _checkpoint.Checkpoints.save

    def save_then_die(self, name, state):
        original(self, name, state)
        saves.append(name)
        if len(saves) == 5:  # Δ-STN's 4 epochs, then random search's first trial of 2
            raise KeyboardInterrupt

    monkeypatch.setattr(_checkpoint.Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(_checkpoint.Checkpoints, "save", original)
    trials = []
    plain_training = _baselines.plain_training
    monkeypatch.setattr(
        _baselines, "plain_training", lambda *a: trials.append(1) or plain_training(*a)
    )
    resumed = main([*args, "--out", str(tmp_path / "killed"), "--resume"])
    # Δ-STN was done, random search had run 1 of its 2 trials (4 epochs, 2 per trial).
    progress = resumed["run"]["progress"]
    assert progress["delta_0"] == {"from": 4, "to": 4}
    assert progress["random_0"] == {"from": 1, "to": 2}
    assert progress["tpe_0"] == {"from": 0, "to": 2}
    assert len(trials) == 1 + 2  # random search's second trial, and TPE's two
    for method in ("delta", "random", "tpe"):
        a, b = fresh[method]["seeds"][0], resumed[method]["seeds"][0]
        assert a["val_loss"] == b["val_loss"]
        np.testing.assert_array_equal(a["hparams"], b["hparams"])


@pytest.mark.slow
def test_resume_with_more_seeds_or_other_methods(tmp_path):
    args = ["ridge", "--quick", "--epochs", "2", "--out", str(tmp_path)]
    main([*args, "--methods", "delta"])
    # Other methods and more seeds are new runs beside the saved ones; the saved run is reused.
    again = main([*args, "--methods", "delta", "random", "--num-seeds", "2", "--resume"])
    progress = again["run"]["progress"]
    assert progress["delta_0"] == {"from": 2, "to": 2}
    assert progress["delta_1"] == {"from": 0, "to": 2}
    assert progress["random_0"] == {"from": 0, "to": 1}
    with pytest.raises(_harness.RunError, match="--epochs: 2 in the saved run, 3 now"):
        main([*args[:-4], "--epochs", "3", "--out", str(tmp_path), "--resume"])


@pytest.mark.slow
def test_digits_mlp_quick(tmp_path):
    results = main(["digits-mlp", "--quick", "--out", str(tmp_path)])
    for method in ("delta", "centred", "stn", "random", "tpe"):
        assert np.isfinite(results[method]["val_loss"])
    # A 64-128-128-10 MLP on 1000 digits reaches a cross-entropy under 0.12 in 40 epochs.
    assert results["delta"]["val_loss"] < 0.12
    assert results["delta"]["test_loss"] < 0.15


@pytest.mark.parametrize("seed", [0, 4])
def test_ridge_flatness_is_measured_on_the_exact_loss(seed):
    task = make_task("ridge", seed, quick=True)
    reference = ridge_closed_form(task)
    lo, hi = reference["flat_log_l2"]
    assert lo <= reference["log_l2"] <= hi
    assert ridge_val_gap(task, reference["log_l2"], reference) == pytest.approx(0, abs=1e-12)
    # Inside the flat range the gap is within the tolerance; a grid step outside it is not
    # (unless the range ends at the search box, as on seed 4, where λ* sits on its edge).
    ((lower, upper, _),) = task.search
    step = (upper - lower) / 240
    for edge, outside in ((lo, lo - step), (hi, hi + step)):
        assert ridge_val_gap(task, edge, reference) <= RIDGE_VAL_GAP
        if lower <= outside <= upper:
            assert ridge_val_gap(task, outside, reference) > RIDGE_VAL_GAP


@pytest.mark.slow
def test_ridge_quick_runs_reach_the_flat_optimum_on_three_seeds(tmp_path):
    args = ["ridge", "--quick", "--num-seeds", "3", "--methods", "delta", "centred"]
    results = main([*args, "--out", str(tmp_path)])
    for method in ("delta", "centred"):
        for run in results[method]["seeds"]:
            assert run["val_gap"] < RIDGE_VAL_GAP, (method, run["seed"], run["hparams"])


@pytest.mark.slow
def test_stability_grid_counts_a_diverged_run_and_resumes_without_retraining(tmp_path):
    # A weight learning rate of 1000 sends every variant's loss to NaN; 0.1 (the task's
    # default) does not. Two epochs each, on digits.
    args = ["--quick", "--epochs", "2", "--lrs", "0.1", "1000", "--hyper-lrs", "0.01"]
    results = stability.main([*args, "--out", str(tmp_path)])
    for variant in stability.VARIANTS:
        cells = {c["lr"]: c for c in results["cells"][variant]}
        assert not cells[0.1]["diverged"] and np.isfinite(cells[0.1]["final_val_loss"])
        assert cells[1000]["diverged"] and not np.isfinite(cells[1000]["final_val_loss"])
        assert results["summary"][variant]["diverged"] == 1
        assert results["summary"][variant]["worst_final_val_loss"] == cells[0.1]["final_val_loss"]
    # Every run is checkpointed under its own name: a resume trains none of the six again
    # (each loop resumes at epoch 2 of 2), and the results are the same.
    again = stability.main([*args, "--out", str(tmp_path), "--resume"])
    assert len(again["run"]["progress"]) == 6
    assert all(p["from"] == p["to"] == 2 for p in again["run"]["progress"].values())
    np.testing.assert_equal(again["summary"], results["summary"])


@pytest.mark.parametrize("variant", ["delta", pytest.param("stn", marks=pytest.mark.slow)])
def test_response_jacobian_check_against_finite_differences(variant):
    # Both sides of the dropout-regression Jacobian check, each against float64 central
    # differences: the exact dw*/du of the closed form, and the network's dw/dh.
    task = make_task("dropout-regression", 0, quick=True)
    model = task.init_model(jax.random.key(0))
    # A random response, so that the learned Jacobian is not zero.
    model = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), model)
    hparams = bnn.HyperParameters(task.specs, scale=task.scale, dtype=task.dtype)
    hparams = eqx.tree_at(lambda hp: hp.values, hparams, hparams.values + jnp.linspace(-1, 1, 10))
    result = dropout_response_jacobian(task, variant, model, hparams)
    (X, y) = map(np.asarray, task.train)
    u, h = np.asarray(hparams.values), np.asarray(bnn.eval_input(variant, hparams))
    eps = 1e-6
    exact_fd = np.stack(
        [
            (
                dropout_weights(np.asarray(hparams.constrain(jnp.asarray(u + eps * e))), X, y)
                - dropout_weights(np.asarray(hparams.constrain(jnp.asarray(u - eps * e))), X, y)
            )
            / (2 * eps)
            for e in np.eye(10)
        ],
        axis=1,
    )
    weights = lambda h: np.asarray(jnp.sum(model.effective_weight(jnp.asarray(h)), axis=0))
    learned_fd = np.stack(
        [(weights(h + eps * e) - weights(h - eps * e)) / (2 * eps) for e in np.eye(10)], axis=1
    )
    np.testing.assert_allclose(result["exact"], exact_fd, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(result["learned"], learned_fd, rtol=1e-5, atol=1e-8)
    assert np.linalg.norm(result["learned"]) > 0
    expected = np.linalg.norm(learned_fd - exact_fd) / np.linalg.norm(exact_fd)
    assert float(result["relerr"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_all_runs_every_cpu_task_into_one_table(tmp_path):
    from experiments.delta_stn.__main__ import CPU_TASKS

    args = ["all", "--quick", "--epochs", "2", "--methods", "delta", "--out", str(tmp_path)]
    results = main(args)
    table = (tmp_path / "table.md").read_text()
    for task in CPU_TASKS:
        assert (tmp_path / task / "results.json").is_file()
        assert f"| {task} | Δ-STN |" in table
        assert np.isfinite(results[task]["delta"]["val_loss"])
    # Resumed, every task's run is read back: no epoch is trained again.
    again = main([*args, "--resume"])
    for task in CPU_TASKS:
        assert again[task]["run"]["progress"]["delta_0"] == {"from": 2, "to": 2}


@pytest.mark.parametrize("rate_cap, finite", [(None, True), (1.0, False)])
def test_rates_at_the_cap_keep_the_gradient_finite_in_float32(rate_cap, finite):
    # u = 30: sigmoid(u) rounds to 1 in float32, so an uncapped rate is exactly 1, 1/(1 − p)
    # is infinite and the gradient NaN; capped at 0.95 it stays finite.
    task = make_task("digits-mlp", 0, True, rate_cap=rate_cap)
    hparams = bnn.HyperParameters(task.specs, scale=0.5, dtype=jnp.float32)
    hparams = eqx.tree_at(lambda hp: hp.values, hparams, jnp.full_like(hparams.values, 30.0))
    model = task.init_model(jax.random.key(0))
    x, y = task.train[0][:8], task.train[1][:8]
    _, grads = bnn.weight_grads(
        "delta", task.apply, task.train_loss, model, hparams, x, y, jax.random.key(1)
    )
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves) == finite


def test_the_reference_recipe_and_the_applied_rates():
    task = make_task("digits-mlp", 0, True, recipe="reference")
    assert (task.scale, task.warmup, task.lr, task.lr_final, task.momentum) == (
        1.0,
        5,
        0.01,
        1.0,
        0.9,
    )
    assert (task.hyper_lr, task.scale_lr, task.rms_decay, task.rms_eps_in_sqrt) == (
        1e-2,
        1e-2,
        0.99,
        False,
    )
    assert [s.upper for s in task.specs] == [0.95] * 3
    # The applied rate E[sigmoid(u + σz)] by quadrature, against Monte Carlo: with σ = 2.5 a
    # reported 0.04 is applied at about 0.15.
    hparams = bnn.HyperParameters(task.specs, scale=2.5, dtype=jnp.float64)
    hparams = eqx.tree_at(
        lambda hp: hp.values, hparams, jnp.full(3, float(np.log(0.04 / 0.91)), jnp.float64)
    )
    z = jax.random.normal(jax.random.key(0), (400_000, 1), jnp.float64)
    monte_carlo = np.asarray(hparams.constrain(hparams.values + hparams.sigma * z)).mean(0)
    applied = applied_values(hparams)
    np.testing.assert_allclose(applied, monte_carlo, atol=2e-3)
    np.testing.assert_allclose(hparams.value(), 0.04, rtol=1e-6)
    assert 0.1 < applied[0] < 0.2
