"""The STN backbones the Δ-STN experiments use, and the regularisers they tune: dropout with
a per-example rate and cutout with a per-example length and number of holes."""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_real
from .._misc import tree_where_nan
from ._stn_layers import StnConv2d, StnLinear


def dropout(x: Array, rate, key: PRNGKeyArray | None, *, train: bool) -> Array:
    """Inverted dropout of one example at `rate` (a scalar, or one rate per entry of `x`;
    possibly traced); the identity
    when `train` is `False` or `key` is `None`. A rate outside $[0, 1)$ (or NaN) is refused
    when concrete, and makes the output NaN when traced: it has no meaning as a dropout
    rate, and $1/(1 - p)$ is unbounded at 1."""
    check_real("rate", rate, lower=0, upper=1, upper_open=True, scalar=False)
    if not train or key is None:
        return x
    keep = jax.random.uniform(key, x.shape, x.dtype) >= rate
    out = jnp.where(keep, x / (1 - rate), jnp.zeros((), x.dtype))
    rate = jnp.asarray(rate)
    return tree_where_nan(~jnp.all((rate >= 0) & (rate < 1)), out)


def cutout(
    image: Float[Array, "c height width"], length, holes, key: PRNGKeyArray, *, max_holes: int
) -> Float[Array, "c height width"]:
    """Zeroes `holes` squares (at most `max_holes`) of side `length` pixels at random centres
    of one image (DeVries & Taylor 2017). `length` and `holes` may be traced (the training
    side floors them); a negative or NaN one is refused when concrete, and makes the image
    NaN when traced."""
    check_real("length", length, lower=0)
    check_real("holes", holes, lower=0)
    _, height, width = image.shape
    centres = jax.random.randint(key, (max_holes, 2), 0, jnp.array([height, width]))
    rows = jnp.arange(height)[None, :, None] - centres[:, 0, None, None]
    cols = jnp.arange(width)[None, None, :] - centres[:, 1, None, None]
    half = jnp.asarray(length, image.dtype) / 2
    inside = (jnp.abs(rows).astype(image.dtype) < half) & (jnp.abs(cols).astype(image.dtype) < half)
    active = (jnp.arange(max_holes, dtype=image.dtype) < holes)[:, None, None]
    mask = jnp.any(inside & active, axis=0)
    out = jnp.where(mask[None], jnp.zeros((), image.dtype), image)
    valid = (jnp.asarray(length) >= 0) & (jnp.asarray(holes) >= 0)
    return tree_where_nan(~valid, out)


class StnMLP(eqx.Module):
    """An MLP of [`bilevax.nn.StnLinear`][] layers with ReLU, and dropout on the input of
    every layer at its own rate.

    **Arguments:**

    - `sizes`: layer widths from input to output, e.g. `(784, 1200, 1200, 10)`.
    - `num_hparams`: the size of the hypernetwork input.
    - `key`, `dtype`: initialisation.

    Call on one example: `model(x, h, rates, key, train=...)`, `rates` holding one dropout
    rate per layer (`len(sizes) - 1` of them).
    """

    layers: tuple[StnLinear, ...]

    def __init__(self, sizes: Sequence[int], num_hparams: int, *, key: PRNGKeyArray, dtype=None):
        if len(sizes) < 2:
            raise ValueError(f"`sizes` must hold at least two widths, got {sizes!r}.")
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            StnLinear(a, b, num_hparams, key=k, dtype=dtype)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys)
        )

    def __call__(self, x, h, rates, key: PRNGKeyArray | None, *, train: bool):
        _check_rates(rates, len(self.layers))
        keys = [None] * len(self.layers) if key is None else jax.random.split(key, len(self.layers))
        for i, layer in enumerate(self.layers):
            x = layer(dropout(x, rates[i], keys[i], train=train), h)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class StnCNN(eqx.Module):
    """A small CNN: two 5x5 [`bilevax.nn.StnConv2d`][] blocks (ReLU, 2x2 max-pool) and two
    [`bilevax.nn.StnLinear`][] layers, with dropout after each conv block and on the input of
    each linear layer (four rates).

    **Arguments:**

    - `in_channels`, `image_size`, `num_classes`: the data.
    - `channels`, `hidden`: the widths.
    - `num_hparams`, `key`, `dtype`: as [`bilevax.nn.StnMLP`][].

    Call on one example: `model(x, h, rates, key, train=...)` with four dropout `rates`.
    """

    conv1: StnConv2d
    conv2: StnConv2d
    fc1: StnLinear
    fc2: StnLinear

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        num_hparams: int,
        *,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 128,
        key: PRNGKeyArray,
        dtype=None,
    ):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        c1, c2 = channels
        self.conv1 = StnConv2d(in_channels, c1, 5, num_hparams, padding=2, key=k1, dtype=dtype)
        self.conv2 = StnConv2d(c1, c2, 5, num_hparams, padding=2, key=k2, dtype=dtype)
        flat = c2 * (image_size // 4) ** 2
        self.fc1 = StnLinear(flat, hidden, num_hparams, key=k3, dtype=dtype)
        self.fc2 = StnLinear(hidden, num_classes, num_hparams, key=k4, dtype=dtype)

    def __call__(self, x, h, rates, key: PRNGKeyArray | None, *, train: bool):
        _check_rates(rates, 4)
        keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
        pool = eqx.nn.MaxPool2d(2, 2)
        x = pool(jax.nn.relu(self.conv1(x, h)))
        x = dropout(x, rates[0], keys[0], train=train)
        x = pool(jax.nn.relu(self.conv2(x, h)))
        x = dropout(x, rates[1], keys[1], train=train).reshape(-1)
        x = jax.nn.relu(self.fc1(dropout(x, rates[2], keys[2], train=train), h))
        return self.fc2(dropout(x, rates[3], keys[3], train=train), h)


def _check_rates(rates, expected: int) -> None:
    """One dropout rate per layer: indexing a shorter array would clamp, reusing the last."""
    if jnp.shape(rates) != (expected,):
        raise ValueError(
            f"`rates` must hold one dropout rate per layer, shape ({expected},); got shape "
            f"{jnp.shape(rates)}."
        )
