"""The lasso-HO experiment (resuming a killed run, counting the steps it runs), and the "Coming
from jaxopt" page's programs: jaxopt's and bilevax's lasso HO, run from the page, give the same
validation-loss trajectory."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest

from experiments import _cli, _harness, lasso_ho


PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "coming-from-jaxopt.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.DOTALL | re.MULTILINE)


@pytest.mark.slow
def test_coming_from_jaxopt_programs_agree():
    pytest.importorskip("jaxopt")
    setup, jaxopt_program, bilevax_program, wrapping = _blocks()[:4]
    assert "jaxopt" in jaxopt_program and "bilevax" in bilevax_program
    # "in as many lines": the two programs have the same number of non-blank lines.
    count = lambda program: sum(1 for line in program.splitlines() if line.strip())
    assert count(jaxopt_program) == count(bilevax_program)
    namespace: dict = {}
    # The page is written for a user's default (standard) dtype promotion; optax's Adam mixes
    # an int32 count with floats.
    with jax.numpy_dtype_promotion("standard"):
        exec(compile(setup, str(PAGE), "exec"), namespace)
        theirs = dict(namespace)
        exec(compile(jaxopt_program, str(PAGE), "exec"), theirs)
        ours = dict(namespace)
        exec(compile(bilevax_program, str(PAGE), "exec"), ours)
        exec(compile(wrapping, str(PAGE), "exec"), ours)
    trajectory = np.asarray(theirs["trajectory"])
    assert len(trajectory) == 20
    assert trajectory[-1] < trajectory[0] - 1e-3  # the outer loop moves
    np.testing.assert_allclose(ours["trajectory"], trajectory, rtol=0, atol=1e-6)
    # The wrapped-solver example: dw*/dλ = -(XᵀX + λI)⁻¹ w* at λ = 1.
    X, y = map(np.asarray, namespace["train"])
    A = X.T @ X + np.eye(10)
    np.testing.assert_allclose(
        ours["dw_dlam"], -np.linalg.solve(A, np.linalg.solve(A, X.T @ y)), rtol=1e-8, atol=1e-10
    )


@pytest.mark.slow
def test_reweighting_hypergradient(tmp_path):
    data = lasso_ho.load(0)
    args = _cli.parser("lasso_ho", "").parse_args(["--out", str(tmp_path)])
    result = lasso_ho.reweighting(data, 5, 3e-4, 0, _harness.start(args))
    assert result["hypergrad_relerr_fd"] < 1e-6
    assert result["hypergrad_relerr_exact"] < 1e-8
    losses = result["history"]["val_loss"]
    assert losses[-1] < losses[0]
    assert result["corrupted_fraction"] == pytest.approx(1 / 3, abs=0.01)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lasso_ho")
    return out, lasso_ho.main(["--quick", "--out", str(out), "--steps", "30"])


@pytest.mark.slow
def test_quick_run(run):
    out, results = run
    for row in results["lasso"]["checks"]:
        assert row["relerr_fd"] < 1e-6
        assert row["relerr_closed_form"] < 1e-10
    for row in results["elastic_net"]["checks"]:
        assert row["relerr_fd"] < 1e-5  # one point has all 10 features active: FD is worse
        assert row["relerr_closed_form"] < 1e-10
    errors = [r["relerr"] for r in results["lasso"]["unrolled_vs_implicit"]]
    assert errors[-1] < 1e-9 and errors[-1] < errors[-2] < errors[-3]
    for kind in ("lasso", "elastic_net"):
        hgd = results[kind]["hgd"]
        assert hgd["val_loss"] < hgd["history"]["val_loss"][0]
        assert hgd["val_loss"] <= 1.01 * results[kind]["grid"]["best_val_loss"]
    rw = results["reweighting"]
    assert rw["hypergrad_relerr_fd"] < 1e-6
    assert rw["val_loss"]["learned"] < rw["val_loss"]["uniform"]
    assert (out / "lasso_ho.png").stat().st_size > 10_000
    assert json.loads((out / "results.json").read_text())["steps"] == 30


@pytest.mark.slow
def test_resume_reproduces(run):
    out, results = run
    again = lasso_ho.main(["--quick", "--out", str(out), "--steps", "30", "--resume"])
    for kind in ("lasso", "elastic_net"):
        np.testing.assert_array_equal(
            again[kind]["hgd"]["final_log_hparams"], results[kind]["hgd"]["final_log_hparams"]
        )
    assert again["reweighting"]["val_loss"] == results["reweighting"]["val_loss"]
    # Nothing is recomputed: every loop and stage is read back.
    assert all(p["from"] == p["to"] for p in again["run"]["progress"].values())


@pytest.mark.slow
def test_hypergradient_descent_resumes_where_it_was_killed(tmp_path, monkeypatch):
    data = lasso_ho.load(0)

    def run(out, *argv):
        args = _cli.parser("lasso_ho", "").parse_args(["--out", str(out), *argv])
        return _harness.start(args)

    descend = lambda run: lasso_ho.hypergradient_descent(data, "lasso", np.log(0.2), 5, 0.2, run)
    whole = descend(run(tmp_path / "whole"))
    value_and_hypergrad, calls = lasso_ho.value_and_hypergrad, []

    def spy(*args, fail_at=None):
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        calls.append(1)
        return value_and_hypergrad(*args)

    with monkeypatch.context() as patch:
        patch.setattr(lasso_ho, "value_and_hypergrad", lambda *a: spy(*a, fail_at=3))
        with pytest.raises(KeyboardInterrupt):
            descend(run(tmp_path / "cut"))
    monkeypatch.setattr(lasso_ho, "value_and_hypergrad", spy)
    calls.clear()
    resumed_run = run(tmp_path / "cut", "--resume")
    resumed = descend(resumed_run)
    assert len(calls) == 2 and resumed_run.progress["hgd_lasso"] == {"from": 3, "to": 5}
    assert resumed["history"]["val_loss"] == whole["history"]["val_loss"]
    np.testing.assert_array_equal(resumed["final_log_hparams"], whole["final_log_hparams"])
