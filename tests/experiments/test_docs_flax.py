"""The examples of docs/flax.md ("Using Flax") run, and do what the page says they do.

The page's ```python blocks are the shared imports and then one example each; every example
runs after the imports in a namespace of its own, as a reader would run it. (The ```py block
of the page is a sketch with names left open, not run.) The page is user code, under JAX's
default dtype promotion, not the suite's strict one: optax's Adam raises a float to an integer
count.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import central_difference, directional, random_direction


pytest.importorskip("flax")

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "flax.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.DOTALL | re.MULTILINE)


def _run(example: int) -> dict:
    """Runs the imports and example `example` (1, 2 or 3) of the page; returns its names."""
    blocks = _blocks()
    namespace: dict = {}
    for block in (blocks[0], blocks[example]):
        exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace


def test_the_page_has_the_imports_and_three_examples():
    blocks = _blocks()
    assert len(blocks) == 4
    assert "from flax import linen, nnx" in blocks[0]


@pytest.mark.slow  # three compilations of an inner solve and its implicit hypergradient
def test_per_layer_weight_decay_by_implicit_hypergradients():
    with jax.numpy_dtype_promotion("standard"):
        ns = _run(1)
        values, h = ns["values"], ns["h"]
        assert values[-1] < values[0]  # hypergradient descent lowers the validation loss
        assert set(h) == {"hidden", "out"} and h["hidden"] != h["out"]  # one decay per layer
        # The page's implicit hypergradient, against central differences of the validation
        # loss at solutions warm-started from the page's last one. They stop at
        # ‖∇L‖ ≤ 1e-10, which leaves ~1e-10 in each loss: a step of 1e-4 keeps that ~1e-6
        # of the difference. Not at the final h, where the hypergradient is nearly zero.
        hypergradient, params = ns["hypergradient"], ns["params"]
        h_test = jax.tree.map(lambda v: v + 0.5, h)
        _, hgrad, _ = hypergradient(h_test, params)
        d = random_direction(h_test, seed=0)
        fd = central_difference(lambda h: hypergradient(h, params)[0], h_test, d, eps=1e-4)
        assert abs(fd) > 1e-4
        assert directional(hgrad, d) == pytest.approx(fd, rel=1e-4)
        inner, outer, train = ns["inner_loss"], ns["outer_loss"], ns["train"]
        # The biases are not penalised: the penalty's gradient has no bias component.
        penalty = lambda p: inner(p, h, train) - outer(p, h, train)
        grads = jax.grad(penalty)(params)
        for layer in ("hidden", "out"):
            assert float(jnp.max(jnp.abs(grads[layer]["bias"][...]))) == 0.0
            assert float(jnp.max(jnp.abs(grads[layer]["kernel"][...]))) > 0.0


def test_linen_unrolled_hypergradient():
    with jax.numpy_dtype_promotion("standard"):
        ns = _run(2)
        g_rev, g_fwd, h = ns["g_rev"], ns["g_fwd"], ns["h_linen"]
        assert set(g_rev) == {"log_l2", "log_lr"}
        for k in g_rev:
            np.testing.assert_allclose(g_rev[k], g_fwd[k], rtol=1e-10, atol=1e-14)
        # The exact derivative of the 50-step map: central differences of its value.
        unrolled = jax.jit(ns["unrolled"])
        d = random_direction(h, seed=1)
        fd = central_difference(lambda h: unrolled(h)[0], h, d)
        assert abs(fd) > 1e-4
        assert directional(g_rev, d) == pytest.approx(fd, rel=1e-7)


@pytest.mark.slow  # the page's meta-step, and two more programs to check it
def test_hyper_representation_over_episodes():
    with jax.numpy_dtype_promotion("standard"):
        ns = _run(3)
        losses = ns["query_losses"]
        assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])  # the representation learns
        # Each episode's hypergradient in the vmapped meta-batch is that episode's alone, and
        # the derivative of its query loss with respect to the backbone.
        episode, episode_hypergrad, backbone = (
            ns["episode"],
            ns["episode_hypergrad"],
            ns["backbone"],
        )
        keys = jax.random.split(jax.random.key(11), 2)
        support, query = jax.vmap(episode)(keys)
        per_episode = jax.jit(episode_hypergrad)
        _, batched = jax.jit(jax.vmap(episode_hypergrad, in_axes=(None, 0, 0)))(
            backbone, support, query
        )
        first = jax.tree.map(lambda x: x[0], (support, query))
        value, hgrad = per_episode(backbone, *first)
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(hgrad)):
            np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b), rtol=1e-12, atol=1e-14)
        d = random_direction(backbone, seed=2)
        fd = central_difference(lambda b: per_episode(b, *first)[0], backbone, d)
        assert abs(fd) > 1e-4
        assert directional(hgrad, d) == pytest.approx(fd, rel=1e-6)
