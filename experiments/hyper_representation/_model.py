"""The hyper-representation: the paper's Omniglot conv net, and the learned inner step size."""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


BN_EPS = 1e-5
# How a block's convolution is lowered; the same function either way.
CONV_LOWERINGS = ("xla", "matmul")


class ConvBlock(eqx.Module):
    """3x3 convolution (no bias: batch norm removes it), batch norm with the statistics of the
    images it is given, ReLU, 2x2 max-pool. Images are NHWC and weights HWIO, the layout XLA's
    CPU and GPU convolutions prefer.

    `conv` picks the lowering of the convolution, not the function:

    - `"xla"`: `lax.conv_general_dilated`, fastest wherever the weights are shared by the
      batch (the unrolled, implicit and ProtoNet heads).
    - `"matmul"`: the 3x3 patches of the image times the weight reshaped to a matrix. With one
      net per episode (MAML, iMAML), `jax.vmap` turns it into a batched matrix product, where
      XLA's CPU backend runs the vmapped convolution as a slow grouped convolution: 1.6-2.5x
      faster on CPU there, 4-5x with `lax.map` over the episodes, and 4.6x slower for shared
      weights (docs/hyper-representation.md).

    (The pooling stays `lax.reduce_window` in both. A reshape and `jnp.max` was 12% faster
    still on CPU, but under `jit` of `vmap` its input gradient came out wrong (off by over 1
    against the per-episode loop, float64, JAX 0.10.2 on CPU), and MAML's adapted weights
    with it; the tests compare the lowerings under `vmap` and `lax.scan` for this reason.)
    """

    weight: Float[Array, "3 3 cin cout"]
    scale: Float[Array, " cout"]
    offset: Float[Array, " cout"]
    conv: Literal["xla", "matmul"] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        key: PRNGKeyArray,
        dtype=None,
        conv: Literal["xla", "matmul"] = "xla",
    ):
        if conv not in CONV_LOWERINGS:
            raise ValueError(f"`conv` must be one of {CONV_LOWERINGS}, got {conv!r}.")
        dtype = jnp.float32 if dtype is None else dtype
        fan_in = 9 * in_channels
        # He-normal: unit-variance pre-activations before the first batch norm kicks in.
        self.weight = jax.random.normal(key, (3, 3, in_channels, out_channels), dtype) * math.sqrt(
            2.0 / fan_in
        )
        self.scale = jnp.ones(out_channels, dtype)
        self.offset = jnp.zeros(out_channels, dtype)
        self.conv = conv

    def __call__(self, x: Float[Array, "n h w cin"]) -> Float[Array, "n h/2 w/2 cout"]:
        y = self._convolve(x)
        # Batch norm over the images of one episode (and the pixels): no running averages,
        # the same computation at meta-training and meta-test time.
        mean = jnp.mean(y, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 2))
        y = (y - mean) * (self.scale * jax.lax.rsqrt(var + BN_EPS)) + self.offset
        y = jax.nn.relu(y)
        return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def _convolve(self, x):
        dimensions = ("NHWC", "HWIO", "NHWC")
        in_channels = x.shape[-1]
        # One input channel: the patches are no smaller than the image, nothing to gain.
        if self.conv == "xla" or in_channels == 1:
            return jax.lax.conv_general_dilated(
                x, self.weight, (1, 1), "SAME", dimension_numbers=dimensions
            )
        patches = jax.lax.conv_general_dilated_patches(
            x, (3, 3), (1, 1), "SAME", dimension_numbers=dimensions
        )
        # The patches' features are ordered (input channel, row, column).
        matrix = jnp.transpose(self.weight, (2, 0, 1, 3)).reshape(9 * in_channels, -1)
        return patches @ matrix


class ConvNet(eqx.Module):
    """`depth` conv blocks; on 28x28 images with 4 blocks (28 → 14 → 7 → 3 → 1) each image
    becomes a `width`-dimensional feature vector (Vinyals et al. 2016; Finn et al. 2017;
    Franceschi et al. 2018 use width 64)."""

    blocks: tuple[ConvBlock, ...]

    def __init__(
        self,
        width: int = 64,
        depth: int = 4,
        *,
        key: PRNGKeyArray,
        dtype=None,
        conv: Literal["xla", "matmul"] = "xla",
    ):
        keys = jax.random.split(key, depth)
        channels = [1] + [width] * depth
        self.blocks = tuple(
            ConvBlock(a, b, key=k, dtype=dtype, conv=conv)
            for a, b, k in zip(channels, channels[1:], keys)
        )

    def __call__(self, images: Float[Array, "n s s 1"]) -> Float[Array, "n d"]:
        x = images
        for block in self.blocks:
            x = block(x)
        return x.reshape(x.shape[0], -1)


class HyperRepresentation(eqx.Module):
    r"""The outer variable $\lambda$: the representation $h_\lambda$ and the inner step size.

    The step size is $\eta = \eta_{\max}\,\sigma(\rho)$ with $\rho$ learned: bounded, so that a
    step size drifting up (as it does on 20-way episodes) cannot leave the range where $T$
    gradient steps on the head are stable, and smooth, so that the bound has no dead gradient.

    The L2 strength of the implicit head (`head="implicit"`) is $\mu = \mu_{\min} + e^{\kappa}$
    with $\kappa$ learned: bounded below, so that the inner problem's condition number, and
    with it the number of inner steps, stays bounded. The unrolled and ProtoNet heads ignore it
    (its gradient is zero there).

    **Arguments:**

    - `width`, `depth`: of the [`ConvNet`][experiments.hyper_representation.ConvNet].
    - `step_size`: the initial $\eta$.
    - `max_step_size`: $\eta_{\max}$.
    - `l2`: the initial $\mu$.
    - `min_l2`: $\mu_{\min}$.
    - `key`: initialises the convolutions.
    - `conv`: the lowering of the convolutions, `"xla"` or `"matmul"` (see
      [`ConvBlock`][experiments.hyper_representation.ConvBlock]); the same function.
    """

    net: ConvNet
    raw_step: Float[Array, ""]
    raw_l2: Float[Array, ""]
    max_step_size: float = eqx.field(static=True)
    min_l2: float = eqx.field(static=True)

    def __init__(
        self,
        width: int = 64,
        depth: int = 4,
        *,
        step_size: float = 0.5,
        max_step_size: float = 2.0,
        l2: float = 0.1,
        min_l2: float = 1e-3,
        key: PRNGKeyArray,
        dtype=None,
        conv: Literal["xla", "matmul"] = "xla",
    ):
        if not 0 < step_size < max_step_size:
            raise ValueError(
                f"`step_size` must be in (0, max_step_size={max_step_size}); got {step_size}."
            )
        if not 0 < min_l2 < l2:
            raise ValueError(f"`l2` must exceed `min_l2={min_l2}` > 0; got {l2}.")
        dtype = jnp.float32 if dtype is None else dtype
        self.net = ConvNet(width, depth, key=key, dtype=dtype, conv=conv)
        p = step_size / max_step_size
        self.raw_step = jnp.asarray(math.log(p / (1 - p)), dtype)
        self.max_step_size = max_step_size
        self.raw_l2 = jnp.asarray(math.log(l2 - min_l2), dtype)
        self.min_l2 = min_l2

    def step_size(self) -> Float[Array, ""]:
        return self.max_step_size * jax.nn.sigmoid(self.raw_step)

    def l2(self) -> Float[Array, ""]:
        return self.min_l2 + jnp.exp(self.raw_l2)
