"""The demo's console table and plot as a new user sees them: the table fits an 80-column
terminal with every number whole, the plot tells the coinciding hypergradient curves apart and
says when the run is a `--quick` one, and both say when the optimum sits on the search box's
bounds. The results are made up in the shape `ridge_l2.main` gives them (no training)."""

import re

import numpy as np
import pytest

from experiments import _outputs, ridge_l2


def _results(quick: bool = True, budget: int = 50, optimum_log_lam=None) -> dict:
    rng = np.random.default_rng(0)
    if optimum_log_lam is None:  # features 1 (sex) and 5, 7 (s2, s4) on the bounds
        optimum_log_lam = [-0.35, -8.0, -3.44, -3.59, -0.47, 4.0, -2.55, 4.0, -3.69, -2.28]
    results = {}
    for k, name in enumerate(ridge_l2.METHODS):
        curve = 0.46619 + 0.05 * np.exp(-np.arange(budget) / (3.0 + k))
        r = dict(
            cv_loss=float(curve[-1]) + 1e-5 * k,
            test_loss=0.52830 + 1e-3 * k,
            cross_validations=budget,
            inner_trainings=5 * budget,
            log_lam=np.round(rng.uniform(-7.9, 3.9, 10), 6),
            best_so_far=curve,
            gap_to_optimum=0.00031 + 1e-3 * k,
        )
        if name.startswith("hgd"):
            relerr = 10.0 ** rng.uniform(-16, -8, budget)
            r.update(
                hypergrad_relerr=relerr,
                hypergrad_relerr_initial=relerr[0],
                hypergrad_relerr_max=relerr.max(),
            )
        results[name] = r
    # The two hypergradient runs coincide, as they do in a real run.
    results["hgd_unrolled"]["best_so_far"] = results["hgd_implicit"]["best_so_far"] + 1e-12
    results["closed_form"] = dict(
        cv_loss=0.46588, test_loss=0.52281, inner_trainings=0, log_lam=np.asarray(optimum_log_lam)
    )
    results["config"] = dict(quick=quick, seed=0, budget=budget, folds=5)
    return results


def _print_table(results, monkeypatch, capsys, columns: int) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    ridge_l2.print_table(results)
    return capsys.readouterr().out


@pytest.mark.parametrize("budget", [50, 200])
def test_table_fits_80_columns_with_every_number_whole(monkeypatch, capsys, budget):
    results = _results(quick=budget == 50, budget=budget)
    out = _print_table(results, monkeypatch, capsys, 80)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    # Every key value is one unbroken token somewhere in the output (not cut by a border,
    # wrapped onto two lines, or elided with "…").
    tokens = set(re.findall(r"[^\s│┃]+", out))
    assert "…" not in out
    for name in (*ridge_l2.METHODS, "closed_form"):
        r = results[name]
        expected = [f"{r['cv_loss']:.5f}", f"{r['test_loss']:.5f}", str(r["inner_trainings"])]
        if "hypergrad_relerr_max" in r:
            expected += [f"{r['hypergrad_relerr_initial']:.1e}", f"{r['hypergrad_relerr_max']:.1e}"]
        assert set(expected) <= tokens, (name, set(expected) - tokens)
    # The learned log λ: a row per feature, holding each method's value in the methods' order.
    entries = [*ridge_l2.METHODS, "closed_form"]
    for i, feature in enumerate(ridge_l2.FEATURES):
        (row,) = [line for line in lines if re.match(rf"│ {feature} +│", line)]
        values = [float(v) for v in re.findall(r"[+-]\d+\.\d", row)]
        expected = [round(float(results[name]["log_lam"][i]), 1) for name in entries]
        np.testing.assert_allclose(values, expected, atol=0.051)
    # The old fixed 120-column table was wider than this: the width is the terminal's.
    wide = _print_table(results, monkeypatch, capsys, 120)
    assert max(len(line) for line in wide.splitlines()) > 80


def test_table_and_note_say_the_optimum_is_on_the_bounds(monkeypatch, capsys):
    out = _print_table(_results(), monkeypatch, capsys, 80)
    # The bound values are starred in the table, and only they.
    assert re.findall(r"[+-]\d\.\d\*", out) == ["-8.0*", "+4.0*", "+4.0*"]
    note = " ".join(out.split())
    assert "sits on the search box [-8, 4]" in note
    assert "lower bound, on sex" in note and "upper bound, on s2, s4" in note
    assert ridge_l2.on_bounds(_results()["closed_form"]["log_lam"]) == ([1], [5, 7])
    # An optimum inside the box gets no note.
    inside = _results(optimum_log_lam=np.linspace(-7.0, 3.0, 10))
    assert ridge_l2.bounds_note(inside) == ""
    assert "search box [" not in _print_table(inside, monkeypatch, capsys, 80)


def _figure(results, monkeypatch):
    saved = {}

    def save_figure(fig, path, dpi=120, rect=(0.0, 0.0, 1.0, 1.0)):
        saved["fig"] = fig
        return path

    monkeypatch.setattr(_outputs, "save_figure", save_figure)
    ridge_l2.plot(results, "unused.png")
    return saved["fig"]


def test_plot_tells_the_curves_apart_and_says_quick_and_bounds(monkeypatch):
    fig = _figure(_results(quick=True), monkeypatch)
    assert "--quick" in fig.get_suptitle()
    best, gap, accuracy, learned = fig.axes
    for ax in (best, gap, accuracy):
        lines = {line.get_label(): line for line in ax.get_lines()}
        implicit, unrolled = lines["HGD, implicit"], lines["HGD, unrolled"]
        # Drawn on top of each other, they differ in line style, width, marker and colour.
        assert implicit.get_linestyle() != unrolled.get_linestyle()
        assert implicit.get_linewidth() > 2 * unrolled.get_linewidth()
        assert implicit.get_marker() != unrolled.get_marker()
        assert implicit.get_color() != unrolled.get_color()
    texts = [t.get_text() for t in gap.texts]
    assert any("coincide" in t for t in texts)
    # In the per-feature panel no two methods share an x position (none hides another).
    points = [line for line in learned.get_lines() if len(line.get_xdata()) == 10]
    xs = [round(float(line.get_xdata()[0]), 3) for line in points]
    assert len(points) == len(ridge_l2.METHODS) + 1 and len(set(xs)) == len(xs)
    # The box's bounds are drawn and named, and the note says the optimum sits on them.
    bounds = {line.get_ydata()[0] for line in learned.get_lines() if len(line.get_ydata()) == 2}
    assert {ridge_l2.LOWER, ridge_l2.UPPER} <= bounds
    notes = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "sits on the search box" in notes and "sex" in notes
    assert sum("on bound" in t.get_text() for t in learned.texts) == 3

    full = _figure(_results(quick=False, budget=200), monkeypatch)
    assert "quick" not in full.get_suptitle()
    assert "200 cross-validations" in full.get_suptitle()
