"""Solvers of constrained and non-smooth inner problems: proximal and projected gradient."""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree

from .._checks import check_callable, check_real
from ._base import AbstractInnerSolver


_FistaState = tuple[PyTree[Array], Array] | None


class _AbstractProximalSolver(AbstractInnerSolver[_FistaState]):
    r"""Shared by the proximal and projected gradient methods: the map
    $T(w) = \operatorname{prox}_{\eta g}(w - \eta \nabla f(w, \lambda), \lambda)$, its fixed
    point, and the residual $(w - T(w)) / \eta$ (the gradient mapping), which is zero exactly at
    a solution of $\min_w f(w, \lambda) + g(w, \lambda)$. It equals $\nabla f$ where $g = 0$,
    so `tol` means the same as for a smooth solver."""

    learning_rate: eqx.AbstractVar[ArrayLike]
    acceleration: eqx.AbstractVar[bool]

    residual_is_gradient: ClassVar[bool] = False

    @abc.abstractmethod
    def _prox(self, x: PyTree[Array], hparams: Any) -> PyTree[Array]:
        """$\\operatorname{prox}_{\\eta g}(x)$ at the hyperparameters `hparams`."""

    def _forward_backward(self, params, grad, args):
        hparams, _ = args
        step = jax.tree.map(lambda w, g: w - self.learning_rate * g, params, grad)
        return self._prox(step, hparams)

    def init(self, fn, params, args):
        del fn, args
        if not self.acceleration:
            return None
        dtype = jnp.result_type(*jax.tree.leaves(params))
        return params, jnp.ones((), dtype)

    def step(self, fn, params, grad, state, args):
        if not self.acceleration:
            return self._forward_backward(params, grad, args), state
        # FISTA (Beck & Teboulle 2009): the step is taken from the extrapolated point `y`.
        assert state is not None
        y, t = state
        new = self._forward_backward(y, jax.grad(fn)(y, args), args)
        t_next = (1 + jnp.sqrt(1 + 4 * t**2)) / 2
        momentum = (t - 1) / t_next
        y = jax.tree.map(lambda n, w: n + momentum * (n - w), new, params)
        return new, (y, t_next)

    def residual(self, fn, params, grad, args):
        del fn
        mapped = self._forward_backward(params, grad, args)
        return jax.tree.map(lambda w, m: (w - m) / self.learning_rate, params, mapped)


class ProximalGradient(_AbstractProximalSolver):
    r"""Proximal gradient descent, accelerated (FISTA) by default, for
    $\min_w f(w, \lambda) + g(w, \lambda)$ where $f$ is the smooth `inner_loss` and $g$ enters
    through its proximal operator:
    $w_{t+1} = \operatorname{prox}_{\eta g}(w_t - \eta \nabla f(w_t, \lambda), \lambda)$.

    With [`bilevax.inner_solve`][] it stops when the gradient mapping
    $\|w - \operatorname{prox}_{\eta g}(w - \eta\nabla f)\| / \eta$ is at most `tol` (the
    gradient norm means nothing at a lasso solution), and [`bilevax.ImplicitAdjoint`][]
    differentiates the fixed point of the map: with $F(w, \lambda) = w - T(w, \lambda)$,
    $\mathrm{d}w^* = -(\partial_w F)^{-1} \partial_\lambda F\,\mathrm{d}\lambda$, a
    non-symmetric system (`lx.CG` is then run on the normal equations). Unrolling
    ([`bilevax.UnrolledAdjoint`][], [`bilevax.unrolled_hypergrad`][]) differentiates the steps.

    **Arguments:**

    - `learning_rate`: the step $\eta$; $1/L$ for an $L$-smooth $f$ converges.
    - `prox`: `prox(x, hparams, scaling) -> x`, jaxopt's signature: the proximal operator of
        $\texttt{scaling}\cdot g(\cdot, \lambda)$, given the same `hparams` as `inner_loss`.
        [`bilevax.prox_lasso`][], [`bilevax.prox_elastic_net`][] and
        [`bilevax.prox_group_lasso`][] take the regularisation strengths as `hparams`
        directly; wrap them when `hparams` holds more, e.g.
        `lambda w, h, s: bx.prox_lasso(w, jnp.exp(h["log_l1"]), s)`.
    - `acceleration`: Nesterov/FISTA momentum; one more gradient evaluation per step.
    """

    learning_rate: ArrayLike
    prox: Callable
    acceleration: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        check_real("learning_rate", self.learning_rate, lower=0, lower_open=True)
        check_callable("prox", self.prox)

    def _prox(self, x, hparams):
        return self.prox(x, hparams, self.learning_rate)


class ProjectedGradient(_AbstractProximalSolver):
    r"""Projected gradient descent, accelerated (FISTA) by default, for
    $\min_{w \in C(\lambda)} f(w, \lambda)$:
    $w_{t+1} = P_{C}(w_t - \eta \nabla f(w_t, \lambda), \lambda)$. It is
    [`bilevax.ProximalGradient`][] with the projection as the proximal operator (of the
    indicator of $C$), so it stops and is differentiated the same way.

    **Arguments:**

    - `learning_rate`: the step $\eta$.
    - `projection`: `projection(x, hparams) -> x`, onto a convex set that may depend on the
        hyperparameters. Use `optax.projections`:
        `lambda w, h: optax.projections.projection_simplex(w)` (probability weights),
        `projection_non_negative`, `projection_box(w, lower, upper)`,
        `projection_l2_ball(w, radius)`, `projection_l1_ball`, ...
    - `acceleration`: Nesterov/FISTA momentum.
    """

    learning_rate: ArrayLike
    projection: Callable
    acceleration: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        check_real("learning_rate", self.learning_rate, lower=0, lower_open=True)
        check_callable("projection", self.projection)

    def _prox(self, x, hparams):
        return _standard_promotion(x, hparams, projection=self.projection)


# `optax.projections.projection_simplex` mixes int and float arrays, which a user's
# `jax_numpy_dtype_promotion="strict"` refuses; its JVP rule is traced lazily, outside any
# `with` block around the call, so the JVP is wrapped too.
@eqx.filter_custom_jvp
def _standard_promotion(x, hparams, *, projection):
    with jax.numpy_dtype_promotion("standard"):
        return projection(x, hparams)


@_standard_promotion.def_jvp
def _standard_promotion_jvp(primals, tangents, *, projection):
    with jax.numpy_dtype_promotion("standard"):
        return eqx.filter_jvp(projection, primals, tangents)
