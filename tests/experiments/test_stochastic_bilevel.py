"""The stochastic bilevel experiment at a tiny size: SOBA, SABA, F2SA and BOME lower the
validation loss,
the outputs are written, and `--resume` runs nothing of a finished run and only what is left of a
killed one (counting the rounds each method runs)."""

import json

import numpy as np
import pytest

from experiments import stochastic_bilevel


# Smaller outer steps than the defaults (tuned at n = 4000, d = 20): at this size the larger
# ones drive some log-strengths to overflow. One inner step and one CG iteration make a
# deterministic step cost 3.4 passes (12 passes at the defaults), so that it runs within the 8
# passes, with its linear solve cut short.
ARGS = [
    *("--quick", "--n-train", "400", "--dim", "5", "--passes", "8", "--batch-size", "8"),
    *("--soba-outer-lr", "2", "--saba-outer-lr", "8", "--inner-steps", "1", "--cg-steps", "1"),
    *("--f2sa-outer-lr", "8", "--bome-outer-lr", "8"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stochastic_bilevel")
    return out, stochastic_bilevel.main([*ARGS, "--out", str(out)])


@pytest.mark.slow
def test_stochastic_methods_lower_the_validation_loss(run):
    _, results = run
    initial = results["initial_val_loss"]
    reference = results["reference"]["val_loss"]
    # The L-BFGS reference is below the start, and each stochastic method closes at least half
    # the gap within 8 data passes (measured: 86% SOBA, 93% SABA, 87% F2SA, 76% BOME).
    assert reference < initial - 0.01
    for name in stochastic_bilevel.STOCHASTIC:
        r = results[name]
        assert r["finite"]
        assert r["val_loss"] < initial - 0.5 * (initial - reference)
        assert r["passes"][-1] <= 8.0 + 1e-9
    deterministic = results["deterministic"]
    assert deterministic["passes"][-1] <= 8.0 + 1e-9
    assert deterministic["steps"] >= 1 and deterministic["finite"]


@pytest.mark.slow
def test_outputs_and_resume(run):
    out, results = run
    written = json.loads((out / "results.json").read_text())
    for name in stochastic_bilevel.METHODS:
        curve = written[name]["val_curve"]
        assert len(curve) == stochastic_bilevel.EVALS_PER_RUN + 1
        assert np.all(np.isfinite(curve))
        assert np.all(np.diff(written[name]["passes"]) >= 0)
    assert (out / "stochastic_bilevel.png").read_bytes().startswith(b"\x89PNG")


def _spies(monkeypatch, fail_at=None):
    """Counts the evaluation rounds each method runs (a chunk of stochastic steps, or one
    deterministic step); with `fail_at`, SABA's round `fail_at` is "killed"."""
    calls = {name: [] for name in stochastic_bilevel.METHODS}
    chunk, step = stochastic_bilevel._stochastic_chunk, stochastic_bilevel.deterministic_step

    def stochastic(solver, *args):
        name = type(solver).__name__.lower()
        if name == "saba" and len(calls["saba"]) == fail_at:
            raise KeyboardInterrupt
        calls[name].append(1)
        return chunk(solver, *args)

    monkeypatch.setattr(stochastic_bilevel, "_stochastic_chunk", stochastic)
    monkeypatch.setattr(
        stochastic_bilevel,
        "deterministic_step",
        lambda *args: calls["deterministic"].append(1) or step(*args),
    )
    return calls


@pytest.mark.slow
def test_resume_of_a_finished_run_runs_nothing(run, monkeypatch):
    out, results = run
    calls = _spies(monkeypatch)
    again = stochastic_bilevel.main([*ARGS, "--out", str(out), "--resume"])
    assert all(c == [] for c in calls.values())
    assert all(p["from"] == p["to"] for p in again["run"]["progress"].values())
    for name in stochastic_bilevel.METHODS:
        assert again[name]["val_curve"] == results[name]["val_curve"]


@pytest.mark.slow
def test_resume_after_kill_runs_only_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(stochastic_bilevel, "EVALS_PER_RUN", 4)
    tiny = [*ARGS[ARGS.index("--dim") :], "--n-train", "120", "--passes", "4"]
    whole = stochastic_bilevel.main([*tiny, "--out", str(tmp_path / "whole")])
    with monkeypatch.context() as patch:
        calls = _spies(patch, fail_at=2)
        with pytest.raises(KeyboardInterrupt):
            stochastic_bilevel.main([*tiny, "--out", str(tmp_path / "cut")])
    assert len(calls["soba"]) == 4 and len(calls["saba"]) == 2
    assert calls["f2sa"] == calls["bome"] == calls["deterministic"] == []
    calls = _spies(monkeypatch)
    resumed = stochastic_bilevel.main([*tiny, "--out", str(tmp_path / "cut"), "--resume"])
    assert len(calls["soba"]) == 0 and len(calls["saba"]) == 2
    assert len(calls["f2sa"]) == len(calls["bome"]) == 4
    assert resumed["run"]["progress"]["saba"] == {"from": 2, "to": 4}
    for name in stochastic_bilevel.METHODS:
        assert resumed[name]["val_curve"] == whole[name]["val_curve"]
        np.testing.assert_array_equal(resumed[name]["final_log_lam"], whole[name]["final_log_lam"])
