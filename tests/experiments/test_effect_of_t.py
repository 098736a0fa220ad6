"""The effect-of-T experiment: its hypergradients (finite differences; reverse, forward and
checkpointed agree), f_T -> f as T grows, the Omniglot selection, resuming a killed run from its
last checkpoint (counting the steps it runs), and (slow) the `--quick` run's qualitative
result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevax as bx
from experiments import _cli, _harness, unroll_length as E
from experiments.data import DEFAULT_DATA


CLASSES, PER_CLASS, DIM, FEATURES = 4, 3, 12, 3


def tiny_problem(seed: int = 0) -> E.Problem:
    """Random 'images' in [0, 1]^DIM, 4 classes with a class-dependent mean."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0, 1, (CLASSES, DIM))

    def part(n):
        y = np.repeat(np.arange(CLASSES), n)
        x = np.clip(means[y] + 0.3 * rng.normal(size=(len(y), DIM)), 0, 1)
        return jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.int32)

    return E.Problem(part(PER_CLASS), part(PER_CLASS), part(2 * PER_CLASS), CLASSES)


@pytest.fixture(scope="module")
def tiny():
    problem = tiny_problem()
    H = jax.random.normal(jax.random.key(1), (FEATURES, DIM), jnp.float64) / jnp.sqrt(
        jnp.asarray(DIM, jnp.float64)
    )
    return problem, H


def _f_T(H, problem, T, l2):
    w = E.t_step_params(H, problem, T, l2)
    return E.outer_loss(w, H, problem.val)


@pytest.mark.parametrize("T", [1, 7])
def test_hypergradient_matches_finite_differences(tiny, T):
    problem, H = tiny
    l2 = 0.05
    value, g = E.hypergrad(H, problem, T, l2)
    assert np.isclose(float(value), float(_f_T(H, problem, T, l2)), rtol=1e-12)
    rng = np.random.default_rng(T)
    eps = 1e-5
    for _ in range(3):
        v = jnp.asarray(rng.normal(size=H.shape), jnp.float64)
        fd = (_f_T(H + eps * v, problem, T, l2) - _f_T(H - eps * v, problem, T, l2)) / (2 * eps)
        directional = jnp.sum(g * v)
        assert abs(float(directional - fd)) <= 1e-7 * max(1.0, abs(float(fd)))


@pytest.mark.slow
def test_reverse_forward_checkpointed_agree(tiny):
    problem, H = tiny
    T, l2 = 20, 0.05
    v_rev, g_rev = E.hypergrad(H, problem, T, l2)
    v_fwd, g_fwd = E.hypergrad(H, problem, T, l2, mode="forward")
    v_ck, g_ck = E.hypergrad(H, problem, T, l2, checkpoints=4)
    assert float(jnp.max(jnp.abs(g_rev))) > 1e-4  # not trivially zero
    for v, g in [(v_fwd, g_fwd), (v_ck, g_ck)]:
        assert abs(float(v - v_rev)) < 1e-12
        assert float(jnp.max(jnp.abs(g - g_rev))) < 1e-10


@pytest.mark.slow
def test_f_T_approaches_f(tiny):
    # μ = 0.5 with step 1 / L̂: a well-conditioned strongly convex inner problem, so gradient
    # descent from zero converges linearly and |f_T - f| shrinks monotonically.
    problem, H = tiny
    l2 = 0.5
    sol = E.converged(H, problem, l2)  # to ‖∇L‖ <= 1e-6, as in the run
    assert sol.result == bx.RESULTS.successful
    f = float(E.outer_loss(sol.params, H, problem.val))
    _, big = E.curvature_bounds(H, problem.train[0], l2)
    gaps = []
    for T in (1, 10, 100, 1000):
        w = E.t_step_params(H, problem, T, l2, step_size=float(1 / big))
        gaps.append(abs(float(E.outer_loss(w, H, problem.val)) - f))
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-6 and gaps[0] > 1e-3


def test_selection_is_disjoint_and_seeded():
    classes, parts = E.select((1623, 20), seed=3)
    assert len(classes) == len(np.unique(classes)) == E.NUM_CLASSES == 100
    assert [p.shape for p in parts] == [(100, 3), (100, 3), (100, 14)]
    drawings = np.concatenate(parts, axis=1)
    assert all(len(np.unique(row)) == 20 for row in drawings)  # disjoint within each class
    again = E.select((1623, 20), seed=3)
    assert np.array_equal(classes, again[0])
    assert not np.array_equal(classes, E.select((1623, 20), seed=4)[0])
    # The paper's 3 / 3 / 15 needs 21 drawings; Omniglot has 20.
    with pytest.raises(ValueError, match="21 drawings"):
        E.select((1623, 20), examples=(3, 3, 15))


needs_data = pytest.mark.skipif(
    not (DEFAULT_DATA / "omniglot" / "images_background.npz").is_file(),
    reason=f"Omniglot is not at {DEFAULT_DATA / 'omniglot'}",
)


@needs_data
def test_omniglot_problem():
    problem = E.load(seed=0)
    for (X, y), n in zip((problem.train, problem.val, problem.test), E.EXAMPLES):
        assert X.shape == (100 * n, 784) and X.dtype == jnp.float64
        assert np.array_equal(np.bincount(np.asarray(y)), np.full(100, n))
        assert 0.0 <= float(X.min()) and float(X.max()) <= 1.0
    # No image appears in two parts.
    rows = [
        {r.tobytes() for r in np.asarray(X)}
        for X in (problem.train[0], problem.val[0], problem.test[0])
    ]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])


@needs_data
@pytest.mark.slow
@pytest.mark.long  # minutes: `nox -s long`, not CI
def test_quick_run(tmp_path):
    results = E.main(["--quick", "--out", str(tmp_path)])
    per_t = results["per_T"]
    ts = sorted(per_t, key=int)
    assert all(per_t[t]["inner_converged"] for t in ts)
    # The paper's result: the gap shrinks with T (here by more than 3x from T = 1 to T = 64) ...
    assert abs(per_t[ts[-1]]["gap"]) < abs(per_t[ts[0]]["gap"]) / 3
    # ... and hypergradient descent learns a representation far above chance (1%).
    assert all(per_t[t]["test_acc"] > 0.25 for t in ts)
    assert max(per_t[t]["test_acc"] for t in ts[1:]) >= per_t[ts[0]]["test_acc"]
    # Reverse-mode memory grows with T; checkpointing cuts it; all modes agree.
    assert per_t[ts[-1]]["temp_bytes"] > 10 * per_t[ts[0]]["temp_bytes"]
    main, reduced = results["comparison"]["main"], results["comparison"]["reduced"]
    (rev, ck), (_, ck_r, fwd) = main.values(), reduced.values()
    assert ck["temp_bytes"] < rev["temp_bytes"] / 2
    for r in (ck, ck_r, fwd):
        assert r["max_abs_diff_vs_reverse"] < 1e-10
    assert (tmp_path / "results.json").is_file() and (tmp_path / "effect_of_t.png").is_file()


def _run(path, *argv):
    args = _cli.parser("unroll_length", "").parse_args(["--out", str(path), *argv])
    return _harness.start(args)


@pytest.mark.slow
def test_train_resumes_from_its_last_checkpoint(tiny, tmp_path, monkeypatch):
    problem, H = tiny
    monkeypatch.setattr(E, "CHECKPOINT_EVERY", 2)
    whole = E.train(3, problem, H, 5, 1e-2, _run(tmp_path / "whole"), 0.05)
    hyper_step, calls = E.hyper_step, []

    def spy(*args, fail_at=None):
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        calls.append(1)
        return hyper_step(*args)

    with monkeypatch.context() as patch:
        patch.setattr(E, "hyper_step", lambda *args: spy(*args, fail_at=4))
        with pytest.raises(KeyboardInterrupt):  # killed in step 3: steps 0-1 are checkpointed
            E.train(3, problem, H, 5, 1e-2, _run(tmp_path / "cut"), 0.05)
    monkeypatch.setattr(E, "hyper_step", spy)
    calls.clear()
    run = _run(tmp_path / "cut", "--resume")
    resumed = E.train(3, problem, H, 5, 1e-2, run, 0.05)
    assert len(calls) == 1 + 3  # the warm-up (compilation) and steps 2, 3, 4
    assert run.progress["T3_steps"] == {"from": 2, "to": 5}
    assert resumed["curve"] == whole["curve"] and resumed["f"] == whole["f"]
    # Finished: read back whole, nothing run.
    calls.clear()
    run = _run(tmp_path / "cut", "--resume")
    assert E.train(3, problem, H, 5, 1e-2, run, 0.05)["curve"] == whole["curve"]
    assert calls == [] and run.progress["T3"] == {"from": 1, "to": 1}
