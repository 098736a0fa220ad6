r"""SOBA and SABA on a strongly convex quadratic bilevel problem with a closed-form optimum.

Per inner sample $i$: $L_i(w, \lambda) = \tfrac12 w^\top Q_i w - b_i^\top w - w^\top B_i \lambda$;
per outer sample $j$: $E_j(w, \lambda) = \tfrac12\|w - c_j\|^2 + \tfrac{\mu}{2}\|\lambda\|^2$.
With bars for means over samples, $w^*(\lambda) = \bar Q^{-1}(\bar b + \bar B \lambda)
= w_0 + K \lambda$ and $h(\lambda) = \tfrac12\|w_0 + K \lambda - \bar c\|^2
+ \tfrac\mu2\|\lambda\|^2$ is minimised at
$\lambda^* = (K^\top K + \mu I)^{-1} K^\top (\bar c - w_0)$.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import relerr

import bilevax as bx


P, K_DIM, N_INNER, N_OUTER, MU = 5, 3, 200, 100, 0.1


def inner_loss(w, lam, batch):
    per_sample = (
        0.5 * jnp.einsum("i,nij,j->n", w, batch["Q"], w)
        - batch["b"] @ w
        - jnp.einsum("i,nij,j->n", w, batch["B"], lam)
    )
    return jnp.mean(per_sample)


def outer_loss(w, lam, batch):
    return 0.5 * jnp.mean(jnp.sum((w - batch["c"]) ** 2, axis=1)) + 0.5 * MU * jnp.sum(lam**2)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    S = 0.5 * rng.normal(size=(N_INNER, P, 2))
    inner_data = {
        "Q": jnp.asarray(np.eye(P) + S @ S.transpose(0, 2, 1)),
        "b": jnp.asarray(rng.normal(size=(N_INNER, P))),
        "B": jnp.asarray(
            0.5 * rng.normal(size=(P, K_DIM)) + 0.5 * rng.normal(size=(N_INNER, P, K_DIM))
        ),
    }
    outer_data = {"c": jnp.asarray(1.0 + rng.normal(size=(N_OUTER, P)))}
    Q, b, B = (inner_data[k].mean(0) for k in ("Q", "b", "B"))
    c = outer_data["c"].mean(0)
    K = jnp.linalg.solve(Q, B)
    w0 = jnp.linalg.solve(Q, b)
    lam_opt = jnp.linalg.solve(K.T @ K + MU * jnp.eye(K_DIM), K.T @ (c - w0))
    closed = {"Q": Q, "c": c, "K": K, "w0": w0, "lam_opt": lam_opt}
    return inner_data, outer_data, closed


@eqx.filter_jit
def _run(solver, num_steps, key, inner_data, outer_data, state=None):
    return bx.contrib.stochastic_bilevel(
        solver,
        outer_loss,
        inner_loss,
        jnp.zeros(P),
        jnp.zeros(K_DIM),
        inner_data,
        outer_data,
        num_steps=num_steps,
        key=key,
        state=state,
    )


def _random_hparams(seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=K_DIM))


@pytest.mark.slow
def test_full_batch_directions_are_the_implicit_hypergradient_at_the_fixed_points():
    inner_data, outer_data, closed = _problem()
    lam = _random_hparams()
    w_star = closed["w0"] + closed["K"] @ lam
    _, hypergrad, info = bx.implicit_hypergrad(
        outer_loss,
        inner_loss,
        w_star,
        lam,
        inner_data,
        outer_data,
        linear_solver=lx.CG(rtol=1e-13, atol=1e-13),
        has_aux=True,
    )
    d = bx.contrib.stochastic_directions(
        outer_loss, inner_loss, w_star, info.adjoint, lam, inner_data, outer_data
    )
    # w* and implicit_hypergrad's adjoint are the zeros of D_w and D_v ...
    assert float(jnp.max(jnp.abs(d.params))) < 1e-12
    assert float(jnp.max(jnp.abs(d.v))) < 1e-12
    # ... and there D_λ is the implicit hypergradient, sign included, and the closed-form
    # gradient of h.
    assert relerr(d.hparams, hypergrad) < 1e-10
    exact = closed["K"].T @ (w_star - closed["c"]) + MU * lam
    assert relerr(d.hparams, exact) < 1e-10


def test_the_adjoint_solves_h_v_equals_the_outer_gradient():
    inner_data, outer_data, closed = _problem()
    lam = _random_hparams()
    w_star = closed["w0"] + closed["K"] @ lam
    # H = Q̄ and ∇_w E = w − c̄ here: v* = H⁻¹ ∇_w E by a dense solve, positive sign.
    v_star = jnp.linalg.solve(closed["Q"], w_star - closed["c"])
    d = bx.contrib.stochastic_directions(
        outer_loss, inner_loss, w_star, v_star, lam, inner_data, outer_data
    )
    assert float(jnp.max(jnp.abs(d.v))) < 1e-12
    # D_v = H v − ∇_w E, so at −v* (the adjoint of the opposite convention) it is −2 ∇_w E.
    d_minus = bx.contrib.stochastic_directions(
        outer_loss, inner_loss, w_star, -v_star, lam, inner_data, outer_data
    )
    assert relerr(d_minus.v, -2 * (w_star - closed["c"])) < 1e-12
    # D_λ = ∂_λE − (∂²_{λw} L) v with ∂²_{λw} L = −B̄ᵀ, ∂_λE = μλ.
    B = inner_data["B"].mean(0)
    assert relerr(d.hparams, MU * lam + B.T @ v_star) < 1e-12


def test_full_batch_soba_reaches_the_hyperoptimum():
    inner_data, outer_data, closed = _problem()
    solver = bx.contrib.SOBA(0.2, 0.1, batch_size=None, outer_batch_size=None)
    state = _run(solver, 3000, jax.random.key(0), inner_data, outer_data)
    assert state.result == bx.RESULTS.successful
    assert relerr(state.hparams, closed["lam_opt"]) < 1e-10
    # v converges to the adjoint H⁻¹ ∇_w E at the optimum.
    w_star = closed["w0"] + closed["K"] @ state.hparams
    v_star = jnp.linalg.solve(closed["Q"], w_star - closed["c"])
    assert relerr(state.v, v_star) < 1e-10


@pytest.mark.slow
def test_soba_with_decreasing_steps_converges():
    inner_data, outer_data, closed = _problem()
    # The rates of Dagréou et al. (2022): ρ_t ∝ t^(-2/5) and γ_t ∝ t^(-3/5).
    solver = bx.contrib.SOBA(
        lambda t: 0.2 / (1.0 + t.astype(jnp.float64) / 100.0) ** 0.4,
        lambda t: 0.1 / (1.0 + t.astype(jnp.float64) / 100.0) ** 0.6,
        batch_size=8,
        outer_batch_size=8,
    )
    keys = jax.random.split(jax.random.key(0), 4)
    errors = {}
    for steps in (2_000, 20_000):
        # vmap over four independent runs (keys), then average their errors.
        states = jax.vmap(lambda k: _run(solver, steps, k, inner_data, outer_data))(keys)
        lams = np.asarray(states.hparams)
        errors[steps] = np.mean([relerr(lam, closed["lam_opt"]) for lam in lams])
    # Measured: 0.032 at 2 000 steps, 0.017 at 20 000. The error's noise part shrinks like
    # sqrt(γ_t) ∝ t^(-0.3), i.e. by 10^(-0.3) ≈ 0.5 over ten times the steps.
    assert errors[20_000] < 0.025
    assert errors[20_000] < 0.7 * errors[2_000]


@pytest.mark.slow
def test_saba_converges_with_constant_steps_where_soba_stalls():
    inner_data, outer_data, closed = _problem()
    key = jax.random.key(1)
    saba = bx.contrib.SABA(0.1, 0.05, batch_size=8, outer_batch_size=8)
    soba = bx.contrib.SOBA(0.1, 0.05, batch_size=8, outer_batch_size=8)
    saba_state = _run(saba, 20_000, key, inner_data, outer_data)
    soba_state = _run(soba, 20_000, key, inner_data, outer_data)
    # Variance reduction: SABA converges linearly with constant steps ...
    assert relerr(saba_state.hparams, closed["lam_opt"]) < 1e-8
    w_star = closed["w0"] + closed["K"] @ saba_state.hparams
    assert relerr(saba_state.params, w_star) < 1e-8
    # ... where SOBA with the same steps and batches stalls at its noise floor.
    assert relerr(soba_state.hparams, closed["lam_opt"]) > 1e-3


@pytest.mark.slow
def test_saba_memory_mean_stays_the_table_mean():
    inner_data, outer_data, _ = _problem()
    # Batches of 64 out of 100 outer samples, drawn with replacement: duplicates are sure.
    solver = bx.contrib.SABA(0.1, 0.05, batch_size=64, outer_batch_size=64)
    state = _run(solver, 50, jax.random.key(2), inner_data, outer_data)
    memory = state.memory
    for table, mean in (("inner", "inner_mean"), ("outer", "outer_mean")):
        table_mean = jax.tree.map(lambda t: jnp.mean(t, axis=0), memory[table])
        assert relerr(memory[mean], table_mean) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver", [bx.contrib.SOBA(0.1, 0.05, 8, 8), bx.contrib.SABA(0.1, 0.05, 8, 8)]
)
def test_a_run_in_pieces_equals_one_run(solver):
    inner_data, outer_data, _ = _problem()
    key = jax.random.key(3)
    whole = _run(solver, 60, key, inner_data, outer_data)
    half = _run(solver, 25, key, inner_data, outer_data)
    rest = _run(solver, 35, key, inner_data, outer_data, state=half)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(rest)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nan_data_gives_nan_directions():
    inner_data, outer_data, closed = _problem()
    lam = _random_hparams()
    w, v = closed["w0"], jnp.ones(P)
    # A NaN in b_i alone would reach only D_w's first entry, and one in c_j only D_v: all
    # three directions are NaN all the same.
    bad_inner = dict(inner_data, b=inner_data["b"].at[3, 0].set(jnp.nan))
    bad_outer = {"c": outer_data["c"].at[5, 1].set(jnp.nan)}
    directions = jax.jit(bx.contrib.stochastic_directions, static_argnums=(0, 1))
    for inner, outer in ((bad_inner, outer_data), (inner_data, bad_outer)):
        d = directions(outer_loss, inner_loss, w, v, lam, inner, outer)
        for tree in (d.params, d.v, d.hparams):
            assert np.all(np.isnan(np.asarray(tree)))


@pytest.mark.parametrize(
    "solver",
    [
        bx.contrib.SOBA(0.1, 0.05, None, None),
        pytest.param(bx.contrib.SABA(0.1, 0.05, 8, 8), marks=pytest.mark.slow),
    ],
    ids=["soba", "saba"],
)
def test_a_nonfinite_run_is_nan_and_says_so_per_task(solver):
    inner_data, outer_data, _ = _problem()
    # Two tasks, vmapped through the jitted scan: the second has one NaN inner sample, which
    # full-batch SOBA sees at its first step and SABA at `init` (its memory pass).
    bad = dict(inner_data, b=inner_data["b"].at[7, 2].set(jnp.nan))
    tasks = jax.tree.map(lambda a, b: jnp.stack([a, b]), inner_data, bad)
    states = jax.vmap(lambda d: _run(solver, 20, jax.random.key(4), d, outer_data))(tasks)
    good, failed = (jax.tree.map(lambda a, i=i: a[i], states) for i in (0, 1))
    assert good.result == bx.RESULTS.successful
    for tree in (good.params, good.v, good.hparams):
        assert np.all(np.isfinite(np.asarray(tree)))
    assert failed.result == bx.RESULTS.nonfinite
    for tree in (failed.params, failed.v, failed.hparams):
        assert np.all(np.isnan(np.asarray(tree)))


def test_a_diverging_run_is_all_nan_not_inf():
    inner_data, outer_data, _ = _problem()
    # An inner step far beyond 2/λmax(H): w and v blow up through inf to NaN.
    solver = bx.contrib.SOBA(100.0, 0.05, None, None)
    state = _run(solver, 500, jax.random.key(0), inner_data, outer_data)
    assert state.result == bx.RESULTS.nonfinite
    for tree in (state.params, state.v, state.hparams):
        assert np.all(np.isnan(np.asarray(tree)))


def test_nonfinite_is_sticky_and_set_at_init():
    inner_data, outer_data, _ = _problem()
    solver = bx.contrib.SOBA(0.1, 0.05, 8, 8)
    state = solver.init(
        outer_loss, inner_loss, jnp.zeros(P), jnp.zeros(K_DIM), inner_data, outer_data
    )
    assert state.result == bx.RESULTS.successful
    # A state marked failed stays failed, with NaN iterates, even if a step would be finite.
    failed = eqx.tree_at(lambda s: s.result, state, bx.RESULTS.nonfinite)
    step = eqx.filter_jit(solver.step)
    after = step(outer_loss, inner_loss, failed, inner_data, outer_data, jax.random.key(0))
    assert after.result == bx.RESULTS.nonfinite
    assert np.all(np.isnan(np.asarray(after.hparams)))
    # Non-finite starting hyperparameters fail at init.
    lam = jnp.zeros(K_DIM).at[0].set(jnp.inf)
    state = solver.init(outer_loss, inner_loss, jnp.zeros(P), lam, inner_data, outer_data)
    assert state.result == bx.RESULTS.nonfinite
    assert np.all(np.isnan(np.asarray(state.params)))


def test_errors_name_the_argument():
    inner_data, outer_data, _ = _problem()
    w, lam = jnp.zeros(P), jnp.zeros(K_DIM)
    solver = bx.contrib.SOBA(0.1, 0.1)
    init = lambda *args, **kwargs: solver.init(outer_loss, inner_loss, *args, **kwargs)
    bad = dict(inner_data, b=inner_data["b"][:10])
    with pytest.raises(ValueError, match="inner_data"):
        init(w, lam, bad, outer_data)
    with pytest.raises(ValueError, match="outer_data"):
        init(w, lam, inner_data, {"c": jnp.asarray(1.0)})
    with pytest.raises(TypeError, match="`params`"):
        init(jnp.zeros(P, int), lam, inner_data, outer_data)
    with pytest.raises(TypeError, match="`params`"):
        init(1.0, lam, inner_data, outer_data)
    with pytest.raises(TypeError, match="`hparams`"):
        init(w, 0.5, inner_data, outer_data)
    with pytest.raises(TypeError, match="`hparams`"):
        init(w, {"a": jnp.arange(K_DIM)}, inner_data, outer_data)
    with pytest.raises(ValueError, match="`v`"):
        init(w, lam, inner_data, outer_data, v=jnp.zeros(P + 1))
    with pytest.raises(TypeError, match="`outer_loss`"):
        solver.init(None, inner_loss, w, lam, inner_data, outer_data)
    with pytest.raises(ValueError, match="batch_size"):
        bx.contrib.SOBA(0.1, 0.1, batch_size=0)
    with pytest.raises(ValueError, match="outer_batch_size"):
        bx.contrib.SABA(0.1, 0.1, outer_batch_size=-1)
    run = lambda solver, hparams: bx.contrib.stochastic_bilevel(
        solver,
        outer_loss,
        inner_loss,
        w,
        hparams,
        inner_data,
        outer_data,
        num_steps=1,
        key=jax.random.key(0),
    )
    for not_a_solver in (bx.contrib.SOBA, bx.GradientDescent(0.1)):
        with pytest.raises(TypeError, match="`solver`"):
            run(not_a_solver, lam)
    with pytest.raises(TypeError, match="`hparams`"):
        run(solver, 0.5)


def test_the_hyperparameter_direction_is_the_cores_statement_of_the_hypergradient():
    # At any (w, v), not only at the solution: D_λ = ∂_λE − Bᵀv, as `_hypergrad` states it
    # for the implicit hypergradient, though SOBA's oracle gets Bᵀv from its own pullback.
    from bilevax._hypergrad import hypergrad_from_adjoint
    from bilevax._ift import GradientOptimality

    inner_data, outer_data, _ = _problem()
    rng = np.random.default_rng(1)
    w, v = jnp.asarray(rng.normal(size=P)), jnp.asarray(rng.normal(size=P))
    lam = jnp.asarray(rng.normal(size=K_DIM))
    directions = bx.contrib.stochastic_directions(
        outer_loss, inner_loss, w, v, lam, inner_data, outer_data
    )
    outer_lam = jax.grad(outer_loss, argnums=1)(w, lam, outer_data)
    inputs = (inner_loss, lam, inner_data)
    expected = hypergrad_from_adjoint(GradientOptimality(None), w, inputs, outer_lam, v)
    assert float(jnp.linalg.norm(expected)) > 0.1
    assert relerr(directions.hparams, expected) < 1e-13
