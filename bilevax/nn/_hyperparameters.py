r"""The hyperparameter container of self-tuning networks: unconstrained values, range
transforms, perturbation scales, entropy and per-example perturbations."""

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_real


_TRANSFORMS = ("sigmoid", "softplus", "identity")


def _inverse_softplus(x: float) -> float:
    # log(e^x − 1), written to stay finite for large x.
    return x + math.log(-math.expm1(-x))


class Hyperparameter(eqx.Module):
    """One hyperparameter's description: its name, initial value and range.

    **Arguments:**

    - `name`: a label (plots, results).
    - `init`: the initial value, in the constrained range.
    - `transform`: how the unconstrained value $u$ maps to the range:
        `"sigmoid"` gives $\\text{lower} + (\\text{upper} - \\text{lower})\\,\\sigma(u)$ (rates,
        bounded strengths), `"softplus"` gives $\\text{lower} + \\log(1 + e^u)$ (positive values),
        `"identity"` gives $u$ (e.g. a log-strength).
    - `lower`, `upper`: the range of a `"sigmoid"` hyperparameter (`lower` only for
        `"softplus"`).
    - `integer`: whether the training side sees the value floored (e.g. a cutout length or
        a number of holes). The hypernetwork always sees the unfloored value.
    """

    name: str = eqx.field(static=True)
    init: float = eqx.field(static=True)
    transform: str = eqx.field(static=True, default="sigmoid")
    lower: float = eqx.field(static=True, default=0.0)
    upper: float = eqx.field(static=True, default=1.0)
    integer: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"`name` must be a str, got {self.name!r}.")
        for field in ("init", "lower", "upper"):
            check_real(field, getattr(self, field))
        if not isinstance(self.integer, bool):
            raise TypeError(f"`integer` must be a bool, got {self.integer!r}.")
        if self.transform not in _TRANSFORMS:
            raise ValueError(
                f"`transform` must be one of {_TRANSFORMS}, got {self.transform!r} "
                f"(hyperparameter {self.name!r})."
            )
        if self.transform == "sigmoid" and not (self.lower < self.init < self.upper):
            raise ValueError(
                f"`init` must lie strictly inside (lower, upper) = ({self.lower}, {self.upper}) "
                f"for a sigmoid hyperparameter, got {self.init} (hyperparameter {self.name!r})."
            )
        if self.transform == "softplus" and not self.init > self.lower:
            raise ValueError(
                f"`init` must be > lower = {self.lower} for a softplus hyperparameter, got "
                f"{self.init} (hyperparameter {self.name!r})."
            )

    def unconstrain(self) -> float:
        """The unconstrained value $u$ whose transform is `init`."""
        if self.transform == "sigmoid":
            t = (self.init - self.lower) / (self.upper - self.lower)
            return math.log(t) - math.log1p(-t)
        if self.transform == "softplus":
            return _inverse_softplus(self.init - self.lower)
        return float(self.init)


class HyperParameters(eqx.Module):
    r"""The hyperparameters $\lambda$ tuned by a self-tuning network, stored unconstrained,
    with a perturbation scale per hyperparameter.

    Training perturbs the unconstrained values per example, $u + \delta$ with
    $\delta \sim \mathcal N(0, \operatorname{diag}\sigma^2)$ and
    $\sigma = \operatorname{softplus}(s)$;
    the hyper step maximises the entropy of that distribution,
    $\sum_i \log(\sigma_i \sqrt{2\pi e})$, weighted by $\tau$, against the validation loss.

    **Arguments:**

    - `specs`: a sequence of [`bilevax.nn.Hyperparameter`][].
    - `scale`: the initial perturbation scale $\sigma$ (the same for every hyperparameter).
    - `dtype`: the dtype of `values` and `scales` (default: JAX's default float).

    **Fields:**

    - `values`: the unconstrained values $u$, shape `(h,)`.
    - `scales`: the unconstrained scales $s$, shape `(h,)`.
    """

    values: Float[Array, " h"]
    scales: Float[Array, " h"]
    specs: tuple[Hyperparameter, ...] = eqx.field(static=True)

    def __init__(self, specs: Sequence[Hyperparameter], *, scale: float = 0.5, dtype=None):
        specs = tuple(specs)
        if not specs or not all(isinstance(s, Hyperparameter) for s in specs):
            raise TypeError("`specs` must be a non-empty sequence of `bilevax.nn.Hyperparameter`.")
        check_real("scale", scale, lower=0, lower_open=True)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        self.specs = specs
        self.values = jnp.asarray([s.unconstrain() for s in specs], dtype)
        self.scales = jnp.full(len(specs), _inverse_softplus(scale), dtype)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def constrain(self, u: Float[Array, "*batch h"], *, train: bool = False) -> Array:
        """Maps unconstrained values (the last axis indexes the hyperparameters) to their
        ranges; with `train=True`, integer hyperparameters are floored."""
        u = jnp.asarray(u)
        if u.shape[-1:] != (len(self.specs),):
            raise ValueError(
                f"`u` must have a last axis of size {len(self.specs)} (one per hyperparameter), "
                f"got shape {u.shape}."
            )
        columns = []
        for i, spec in enumerate(self.specs):
            x = u[..., i]
            if spec.transform == "sigmoid":
                x = spec.lower + (spec.upper - spec.lower) * jax.nn.sigmoid(x)
            elif spec.transform == "softplus":
                x = spec.lower + jax.nn.softplus(x)
            if spec.integer and train:
                x = jnp.floor(x)
            columns.append(x)
        return jnp.stack(columns, axis=-1)

    def value(self, *, train: bool = False) -> Float[Array, " h"]:
        """The current hyperparameters in their ranges."""
        return self.constrain(self.values, train=train)

    @property
    def sigma(self) -> Float[Array, " h"]:
        """The perturbation scales $\\sigma = \\operatorname{softplus}(s)$."""
        return jax.nn.softplus(self.scales)

    def entropy(self) -> Float[Array, ""]:
        r"""The entropy $\sum_i \log(\sigma_i\sqrt{2\pi e})$ of the perturbation distribution."""
        sigma = self.sigma
        return jnp.sum(jnp.log(sigma) + 0.5 * jnp.log(2 * jnp.pi * jnp.e).astype(sigma.dtype))

    def perturbation(self, key: PRNGKeyArray, batch: int) -> Float[Array, "batch h"]:
        """Per-example perturbations $\\delta = \\sigma \\odot \\epsilon$ with
        $\\epsilon \\sim N(0, I)$, one row per example; differentiable in the scales."""
        eps = jax.random.normal(key, (batch, len(self.specs)), self.values.dtype)
        return self.sigma * eps
