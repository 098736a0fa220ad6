r"""SOBA and SABA on a strongly convex quadratic bilevel problem with a closed-form optimum.

Per inner sample $i$: $G_i(z, x) = \tfrac12 z^\top Q_i z - b_i^\top z - z^\top B_i x$; per
outer sample $j$: $F_j(z, x) = \tfrac12\|z - c_j\|^2 + \tfrac{\mu}{2}\|x\|^2$. With bars for
means over samples, $z^*(x) = \bar Q^{-1}(\bar b + \bar B x) = z_0 + K x$ and
$h(x) = \tfrac12\|z_0 + K x - \bar c\|^2 + \tfrac\mu2\|x\|^2$ is minimised at
$x^* = (K^\top K + \mu I)^{-1} K^\top (\bar c - z_0)$.
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


def inner_loss(z, x, batch):
    per_sample = (
        0.5 * jnp.einsum("i,nij,j->n", z, batch["Q"], z)
        - batch["b"] @ z
        - jnp.einsum("i,nij,j->n", z, batch["B"], x)
    )
    return jnp.mean(per_sample)


def outer_loss(z, x, batch):
    return 0.5 * jnp.mean(jnp.sum((z - batch["c"]) ** 2, axis=1)) + 0.5 * MU * jnp.sum(x**2)


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
    z0 = jnp.linalg.solve(Q, b)
    x_opt = jnp.linalg.solve(K.T @ K + MU * jnp.eye(K_DIM), K.T @ (c - z0))
    closed = {"Q": Q, "c": c, "K": K, "z0": z0, "x_opt": x_opt}
    return inner_data, outer_data, closed


@eqx.filter_jit
def _run(solver, num_steps, key, inner_data, outer_data, state=None):
    return bx.stochastic_bilevel(
        solver,
        inner_loss,
        outer_loss,
        jnp.zeros(P),
        jnp.zeros(K_DIM),
        inner_data,
        outer_data,
        num_steps=num_steps,
        key=key,
        state=state,
    )


def test_full_batch_directions_are_the_implicit_hypergradient_at_the_fixed_points():
    inner_data, outer_data, closed = _problem()
    x = jnp.asarray(np.random.default_rng(1).normal(size=K_DIM))
    z_star = closed["z0"] + closed["K"] @ x
    v_star = -jnp.linalg.solve(closed["Q"], z_star - closed["c"])
    d = bx.stochastic_directions(inner_loss, outer_loss, z_star, v_star, x, inner_data, outer_data)
    # z* and v* are the zeros of D_z and D_v ...
    assert float(jnp.max(jnp.abs(d.params))) < 1e-12
    assert float(jnp.max(jnp.abs(d.v))) < 1e-12
    # ... and there D_x is the implicit hypergradient, and the closed-form gradient of h.
    _, hypergrad = bx.implicit_hypergrad(
        outer_loss,
        inner_loss,
        z_star,
        x,
        inner_data,
        outer_data,
        linear_solver=lx.CG(rtol=1e-13, atol=1e-13),
    )
    assert relerr(d.hparams, hypergrad) < 1e-10
    exact = closed["K"].T @ (z_star - closed["c"]) + MU * x
    assert relerr(d.hparams, exact) < 1e-10


def test_full_batch_soba_reaches_the_hyperoptimum():
    inner_data, outer_data, closed = _problem()
    solver = bx.SOBA(0.2, 0.1, batch_size=None, outer_batch_size=None)
    state = _run(solver, 3000, jax.random.key(0), inner_data, outer_data)
    assert relerr(state.hparams, closed["x_opt"]) < 1e-10


def test_soba_with_decreasing_steps_converges():
    inner_data, outer_data, closed = _problem()
    # The rates of Dagréou et al. (2022): ρ_t ∝ t^(-2/5) and γ_t ∝ t^(-3/5).
    solver = bx.SOBA(
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
        errors[steps] = np.mean([relerr(x, closed["x_opt"]) for x in np.asarray(states.hparams)])
    # Measured: 0.032 at 2 000 steps, 0.017 at 20 000. The error's noise part shrinks like
    # sqrt(γ_t) ∝ t^(-0.3), i.e. by 10^(-0.3) ≈ 0.5 over ten times the steps.
    assert errors[20_000] < 0.025
    assert errors[20_000] < 0.7 * errors[2_000]


def test_saba_converges_with_constant_steps_where_soba_stalls():
    inner_data, outer_data, closed = _problem()
    key = jax.random.key(1)
    saba = _run(
        bx.SABA(0.1, 0.05, batch_size=8, outer_batch_size=8), 20_000, key, inner_data, outer_data
    )
    soba = _run(
        bx.SOBA(0.1, 0.05, batch_size=8, outer_batch_size=8), 20_000, key, inner_data, outer_data
    )
    # Variance reduction: SABA converges linearly with constant steps ...
    assert relerr(saba.hparams, closed["x_opt"]) < 1e-8
    z_star = closed["z0"] + closed["K"] @ saba.hparams
    assert relerr(saba.params, z_star) < 1e-8
    # ... where SOBA with the same steps and batches stalls at its noise floor.
    assert relerr(soba.hparams, closed["x_opt"]) > 1e-3


def test_saba_memory_mean_stays_the_table_mean():
    inner_data, outer_data, _ = _problem()
    # Batches of 64 out of 100 outer samples, drawn with replacement: duplicates are sure.
    solver = bx.SABA(0.1, 0.05, batch_size=64, outer_batch_size=64)
    state = _run(solver, 50, jax.random.key(2), inner_data, outer_data)
    memory = state.memory
    for table, mean in (("inner", "inner_mean"), ("outer", "outer_mean")):
        table_mean = jax.tree.map(lambda t: jnp.mean(t, axis=0), memory[table])
        assert relerr(memory[mean], table_mean) < 1e-12


@pytest.mark.parametrize(
    "solver",
    [
        # The driver's key handling is shared; SOBA's variant only adds run time.
        pytest.param(bx.SOBA(0.1, 0.05, 8, 8), marks=pytest.mark.slow),
        bx.SABA(0.1, 0.05, 8, 8),
    ],
)
def test_a_run_in_pieces_equals_one_run(solver):
    inner_data, outer_data, _ = _problem()
    key = jax.random.key(3)
    whole = _run(solver, 60, key, inner_data, outer_data)
    half = _run(solver, 25, key, inner_data, outer_data)
    rest = _run(solver, 35, key, inner_data, outer_data, state=half)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(rest)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors_name_the_argument():
    inner_data, outer_data, _ = _problem()
    z, x = jnp.zeros(P), jnp.zeros(K_DIM)
    solver = bx.SOBA(0.1, 0.1)
    bad = dict(inner_data, b=inner_data["b"][:10])
    with pytest.raises(ValueError, match="inner_data"):
        solver.init(inner_loss, outer_loss, z, x, bad, outer_data)
    with pytest.raises(ValueError, match="outer_data"):
        solver.init(inner_loss, outer_loss, z, x, inner_data, {"c": jnp.asarray(1.0)})
    with pytest.raises(TypeError, match="params"):
        solver.init(inner_loss, outer_loss, jnp.zeros(P, int), x, inner_data, outer_data)
    with pytest.raises(ValueError, match="batch_size"):
        bx.SOBA(0.1, 0.1, batch_size=0)
    with pytest.raises(ValueError, match="outer_batch_size"):
        bx.SABA(0.1, 0.1, outer_batch_size=-1)
    with pytest.raises(TypeError, match="solver"):
        bx.stochastic_bilevel(
            bx.GradientDescent(0.1),  # pyright: ignore[reportArgumentType]
            inner_loss,
            outer_loss,
            z,
            x,
            inner_data,
            outer_data,
            num_steps=1,
            key=jax.random.key(0),
        )
