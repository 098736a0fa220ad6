r"""STN layers: general weights, response weights and a hyper-bottleneck.

A layer computes

$$y = W x + b + (H h) \odot (V x + c),$$

with general weights $(W, b)$, response weights $(V, c)$ and a bottleneck $H$ (initialised to
zero) that maps the hypernetwork input $h$ to one scale per output unit. With $h = \lambda$ this
is the STN of MacKay et al. (2019); with $h = \lambda - \lambda_0$ the best-response is centred
at the general weights, which the centred STN and Δ-STN (Bae & Grosse 2020) use.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class StnLinear(eqx.Module):
    """A linear layer whose response to the hyperparameters is learned.

    **Arguments:**

    - `in_features`, `out_features`: as `eqx.nn.Linear`.
    - `num_hparams`: the size of the hypernetwork input $h$.
    - `use_bias`: whether the general and response maps have biases.
    - `key`: initialises the general and response weights (the bottleneck starts at zero, so
        the layer starts as a plain linear layer).
    - `dtype`: of every weight.
    """

    general: eqx.nn.Linear
    response: eqx.nn.Linear
    bottleneck: Float[Array, "out h"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_hparams: int,
        *,
        use_bias: bool = True,
        key: PRNGKeyArray,
        dtype=None,
    ):
        kg, kr = jax.random.split(key)
        self.general = eqx.nn.Linear(in_features, out_features, use_bias, key=kg, dtype=dtype)
        self.response = eqx.nn.Linear(in_features, out_features, use_bias, key=kr, dtype=dtype)
        self.bottleneck = jnp.zeros((out_features, num_hparams), self.general.weight.dtype)

    def __call__(
        self, x: Float[Array, " in"], h: Float[Array, " h"] | None
    ) -> Float[Array, " out"]:
        """One example: `x` of shape `(in_features,)`, `h` of shape `(num_hparams,)`;
        `h=None` applies the general weights only (a plain layer, without the response's
        cost)."""
        if h is None:
            return self.general(x)
        if h.shape != (self.bottleneck.shape[1],):
            raise ValueError(
                f"`h` must have shape ({self.bottleneck.shape[1]},), got {h.shape}; call the "
                "layer on one example and `jax.vmap` over a batch."
            )
        return self.general(x) + (self.bottleneck @ h) * self.response(x)

    def effective_weight(self, h: Float[Array, " h"]) -> Float[Array, "out in"]:
        """The weight matrix the layer applies at `h`: $W + \\operatorname{diag}(H h) V$."""
        return self.general.weight + (self.bottleneck @ h)[:, None] * self.response.weight


class StnConv2d(eqx.Module):
    """A 2-D convolution whose response to the hyperparameters is learned: the bottleneck
    scales each output channel of the response convolution.

    **Arguments:**

    - `in_channels`, `out_channels`, `kernel_size`, `stride`, `padding`: as `eqx.nn.Conv2d`.
    - `num_hparams`: the size of the hypernetwork input $h$.
    - `key`, `dtype`: as [`bilevax.nn.StnLinear`][].
    """

    general: eqx.nn.Conv2d
    response: eqx.nn.Conv2d
    bottleneck: Float[Array, "out h"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_hparams: int,
        *,
        stride: int = 1,
        padding: int | str = 0,
        use_bias: bool = True,
        key: PRNGKeyArray,
        dtype=None,
    ):
        kg, kr = jax.random.split(key)
        self.general, self.response = (
            eqx.nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                use_bias=use_bias,
                key=k,
                dtype=dtype,
            )
            for k in (kg, kr)
        )
        self.bottleneck = jnp.zeros((out_channels, num_hparams), self.general.weight.dtype)

    def __call__(
        self, x: Float[Array, "c_in height width"], h: Float[Array, " h"] | None
    ) -> Float[Array, "c_out height2 width2"]:
        """One example: `x` of shape `(in_channels, height, width)`, `h` of shape
        `(num_hparams,)`; `h=None` applies the general weights only."""
        if h is None:
            return self.general(x)
        if h.shape != (self.bottleneck.shape[1],):
            raise ValueError(
                f"`h` must have shape ({self.bottleneck.shape[1]},), got {h.shape}; call the "
                "layer on one example and `jax.vmap` over a batch."
            )
        return self.general(x) + (self.bottleneck @ h)[:, None, None] * self.response(x)


def _is_response(path) -> bool:
    return any(
        isinstance(k, jax.tree_util.GetAttrKey) and k.name in ("response", "bottleneck")
        for k in path
    )


def response_filter(model) -> "eqx.Module":
    """A filter spec of `model` (same structure, booleans as leaves): `True` on the
    floating-point arrays of the response weights and bottlenecks of every STN layer.

    **Returns:**

    A pytree for `eqx.partition(model, response_filter(model))`.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: eqx.is_inexact_array(leaf) and _is_response(path), model
    )


def split_weights(model) -> tuple:
    """`(general, response, static)`: the model's floating-point arrays split into general
    weights and response weights (response maps and bottlenecks of the STN layers), and the
    rest; `eqx.combine(general, response, static)` rebuilds the model."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    response, general = eqx.partition(params, response_filter(params))
    return general, response, static
