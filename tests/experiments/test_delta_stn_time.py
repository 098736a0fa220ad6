"""The Δ-STN time study (`experiments.delta_stn.time_budget`) and the fair-budget search
(`experiments.delta_stn.fair_budget`): the best-so-far bookkeeping against hand computations,
the paired statistics against scipy on the differences, the fair-budget rule, and resumable
runs that count what they train."""

import numpy as np
import pytest
import scipy.stats

from experiments.delta_stn import fair_budget, time_budget


def test_best_by_takes_only_what_ended_in_time():
    seconds = [1.0, 2.0, 3.0, 4.0]
    val = [0.5, np.nan, 0.2, 0.1]
    test = [0.6, 0.0, 0.3, 0.05]
    assert np.isnan(time_budget.best_by(seconds, val, test, 0.5)).all()  # nothing ended yet
    assert time_budget.best_by(seconds, val, test, 2.5) == (0.5, 0.6)  # NaN is not a best
    assert time_budget.best_by(seconds, val, test, 3.0) == (0.2, 0.3)  # ended at 3 s: counts
    assert time_budget.best_by(seconds, val, test, 100.0) == (0.1, 0.05)


def _timeline(seconds, val, sigma=None):
    out = dict(seconds=seconds, val=val, test=[2 * v for v in val], hparams=[0.1, 0.2])
    if sigma is not None:  # a self-tuning run: its scales and applied rates
        out |= dict(sigma=[sigma, 2 * sigma], applied=[0.1 + sigma, 0.2 + sigma])
    return out


def test_summary_reads_each_fraction_of_each_seeds_budget():
    # Two seeds with budgets 10 and 20 s: at 50 % the first seed counts what ended by 5 s, the
    # second by 10 s.
    per_seed = []
    for budget, shift in ((10.0, 0.0), (20.0, 0.1)):
        scale = budget / 10
        seed = {
            m: _timeline([scale * 4.0, scale * 8.0], [0.4 + shift, 0.3 + shift], scale)
            for m in ("delta", "centred")
        }
        seed["stn"] = _timeline([scale * 2.0], [0.9 + shift], scale)
        seed["random"] = _timeline([scale * 6.0, scale * 9.0], [0.35 + shift, 0.25 + 2 * shift])
        seed["tpe"] = _timeline([scale * 11.0], [0.1])  # ends after the budget: never counts
        seed["budget"] = budget
        per_seed.append(seed)
    summary = time_budget.summarise(per_seed)
    delta = summary["delta"]["by_fraction"]
    assert np.isnan(delta["0.25"]["val_mean"])  # the first epoch ends at 40 % of the budget
    np.testing.assert_allclose(delta["0.5"]["val"], [0.4, 0.5])
    np.testing.assert_allclose(delta["1"]["val"], [0.3, 0.4])
    np.testing.assert_allclose(delta["1"]["test"], [0.6, 0.8])
    np.testing.assert_allclose(summary["random"]["by_fraction"]["1"]["val"], [0.25, 0.45])
    assert np.isnan(summary["tpe"]["by_fraction"]["1"]["val"]).all()
    paired = summary["random"]["paired"]["1"]["val"]
    np.testing.assert_allclose([paired["mean"], paired["sd"]], [0.0, 0.1 / np.sqrt(2)], atol=1e-12)
    assert paired["wins"] == 1  # 0.25 < 0.3 on the first seed, 0.45 > 0.4 on the second
    assert summary["random"]["evaluations"] == [2, 2]
    assert summary["random"]["hparams"] == [0.1, 0.2]
    # σ and the applied rates, averaged over the seeds (σ = 1 and 2), for the self-tuning
    # runs only, and in the table.
    np.testing.assert_allclose(summary["delta"]["sigma"], [1.5, 3.0])
    np.testing.assert_allclose(summary["delta"]["applied"], [1.6, 1.7])
    assert "sigma" not in summary["random"]
    table = time_budget.markdown_table(summary, [10.0, 20.0])
    assert "| σ | applied |" in table
    assert "| 1.5, 3 | 1.6, 1.7 |" in table


def test_paired_statistics_are_those_of_the_differences():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=5)
    values = reference + rng.normal(0.3, 0.2, size=5)
    result = time_budget.paired(values, reference)
    diff = values - reference
    np.testing.assert_allclose(result["mean"], diff.mean())
    np.testing.assert_allclose(result["sd"], diff.std(ddof=1))
    assert result["wins"] == int(np.sum(diff < 0)) and result["seeds"] == 5
    np.testing.assert_allclose(result["wilcoxon_p"], scipy.stats.wilcoxon(diff).pvalue)
    one_sample = scipy.stats.ttest_1samp(diff, 0.0).pvalue  # the paired t-test, by hand
    np.testing.assert_allclose(result["t_p"], one_sample)
    assert np.isnan(time_budget.paired(values, np.full(5, np.nan))["mean"])


def test_fair_budget_is_where_doubling_stops_paying():
    budgets = [10, 20, 40, 80]
    assert fair_budget.fair_budget(budgets, [1.0, 0.5, 0.495, 0.49], 0.02) == 20
    assert fair_budget.fair_budget(budgets, [1.0, 0.5, 0.4, 0.3], 0.02) is None
    # A loss that rises again (overfitting) has flattened too.
    assert fair_budget.fair_budget(budgets, [1.0, 1.1, 0.4, 0.3], 0.02) == 10
    assert fair_budget.fair_budget(budgets, [1.0, np.nan, 0.4, 0.3], 0.02) is None
    # A setting that diverged is no candidate for the tuned loss; all diverged gives NaN.
    assert fair_budget.tuned_loss({"0": np.nan, "0.3": 0.2, "0.5": 0.25}) == (0.2, "0.3")
    loss, label = fair_budget.tuned_loss({"0": np.nan})
    assert np.isnan(loss) and label is None
    assert fair_budget.settings([0.0, 0.3], 3) == {
        "0": [0.0] * 3,
        "0.3": [0.3] * 3,
        fair_budget.CLASSIC: [0.2, 0.5, 0.5],
    }


@pytest.mark.slow
def test_time_study_gives_every_method_the_budget_and_resumes_without_retraining(
    tmp_path, monkeypatch
):
    args = ["digits-mlp", "--quick", "--num-seeds", "1", "--epochs", "2", "--trial-epochs", "1"]
    args += ["--budget-factor", "1.5", "--out", str(tmp_path)]
    results = time_budget.main(args)
    seed = results["per_seed"][0]
    longest = max(seed[m]["seconds"][-1] for m in time_budget.SELF_TUNING)
    np.testing.assert_allclose(seed["budget"], 1.5 * longest)
    for method in ("random", "tpe"):
        started = np.concatenate([[0.0], seed[method]["seconds"][:-1]])
        # Every trial started within the budget, and the search stopped only once it was spent.
        assert (started < seed["budget"]).all() and seed[method]["seconds"][-1] >= seed["budget"]
    assert len(seed["delta"]["val"]) == 2
    trials = []
    plain_training = time_budget.search.__globals__["plain_training"]
    monkeypatch.setitem(
        time_budget.search.__globals__,
        "plain_training",
        lambda *a: trials.append(1) or plain_training(*a),
    )
    again = time_budget.main([*args, "--resume"])
    assert trials == []  # nothing trained again, not even with the budget re-measured
    assert all(p["from"] == p["to"] for p in again["run"]["progress"].values())
    np.testing.assert_equal(again["per_seed"], results["per_seed"])


@pytest.mark.slow
def test_fair_budget_study_resumes_without_retraining(tmp_path, monkeypatch):
    args = ["digits-mlp", "--quick", "--epochs", "1", "3", "--rates", "0", "0.5"]
    args += ["--out", str(tmp_path)]
    results = fair_budget.main(args)
    assert len(results["cells"]) == 2 * 3  # two budgets, two rates and the classic setting
    # The tuned loss is the best setting's, and 3 epochs beat 1 on digits.
    for e, tuned in zip([1, 3], results["tuned"]):
        assert tuned == min(c["val"] for c in results["cells"] if c["epochs"] == e)
    assert results["tuned"][1] < results["tuned"][0]
    calls = []
    monkeypatch.setattr(fair_budget, "plain_training", lambda *a: calls.append(1))
    again = fair_budget.main([*args, "--resume"])
    assert calls == [] and again["tuned"] == results["tuned"]
