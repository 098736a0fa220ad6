"""Solvers of constrained and non-smooth inner problems: proximal and projected gradient."""

import abc
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree

from .._checks import check_callable, check_real
from .._misc import tree_isfinite, tree_norm
from ._base import AbstractInnerSolver


# FISTA's extrapolated point `y`, its momentum sequence `t`, and the loss and the norm of the
# gradient mapping at the `y` of the last step (its stopping test).
_FistaState = tuple[PyTree[Array], Array, Array, Array] | None


class _AbstractProximalSolver(AbstractInnerSolver[_FistaState]):
    r"""Shared by the proximal and projected gradient methods: the map
    $T(w) = \operatorname{prox}_{\eta g}(w - \eta \nabla f(w, \lambda), \lambda)$, its fixed
    point, and the residual $G(w) = (w - T(w)) / \eta$ (the gradient mapping), which is zero
    exactly at a solution of $\min_w f(w, \lambda) + g(w, \lambda)$. It equals $\nabla f$
    where $g = 0$, so `tol` means the same as for a smooth solver.

    Accelerated (FISTA), a step evaluates one gradient, at the extrapolated point $y_k$, and
    returns $w_{k+1} = T(y_k)$; the loop stops once $\|G(y_k)\| = \|y_k - w_{k+1}\| / \eta$
    is at most `tol`. For a convex $f$ and $\eta \le 2/L$, $T$ is nonexpansive, so
    $\|G(w_{k+1})\| \le \|G(y_k)\|$: the returned point passes the test too. The result and
    `grad_norm` are judged there, so where it does not (a non-convex $f$, a larger step) the
    result says that `tol` was not reached."""

    learning_rate: eqx.AbstractVar[ArrayLike]
    acceleration: eqx.AbstractVar[bool]

    @property
    def residual_is_gradient(self) -> bool:
        return self._identity_prox

    # Whether the proximal operator is known to be the identity ($g = 0$): the gradient
    # mapping is then the gradient itself, with a symmetric Jacobian for the implicit adjoint.
    _identity_prox: ClassVar[bool] = False

    @abc.abstractmethod
    def _prox(self, x: PyTree[Array], hparams: Any) -> PyTree[Array]:
        r"""$\operatorname{prox}_{\eta g}(x)$ at the hyperparameters `hparams`."""

    @property
    def evaluates_own_gradient(self) -> bool:
        return self.acceleration

    def _forward_backward(self, params, grad, args):
        hparams, _ = args
        step = jax.tree.map(lambda w, g: w - self.learning_rate * g, params, grad)
        return self._prox(step, hparams)

    def _mapping(self, params, grad, mapped):
        r"""The gradient mapping $G$ at `params`, given `mapped` $= T(\text{params})$."""
        if self._identity_prox:
            return grad
        return jax.tree.map(lambda w, m: (w - m) / self.learning_rate, params, mapped)

    def init(self, fn, params, args):
        if not self.acceleration:
            return None
        dtype = jnp.result_type(*jax.tree.leaves(params))
        loss = eqx.filter_eval_shape(fn, params, args)
        # The loss and norm are read only after a step has set them.
        return params, jnp.ones((), dtype), jnp.zeros((), loss.dtype), jnp.zeros((), dtype)

    def step(self, fn, params, grad, state, args):
        if not self.acceleration:
            return self._forward_backward(params, grad, args), state
        # FISTA (Beck & Teboulle 2009): the step is taken from the extrapolated point `y`, and
        # the gradient there is the only one it evaluates (the driver passes none).
        assert state is not None
        y, t, _, _ = state
        loss, grad = jax.value_and_grad(fn)(y, args)
        new = self._forward_backward(y, grad, args)
        # The stopping test's loss and norm at `y`, never differentiated (the norm's derivative
        # at a zero mapping is not finite). A non-finite gradient need not reach the norm (a
        # projection may map NaN into its set), so it makes the loss NaN.
        norm = tree_norm(jax.lax.stop_gradient(self._mapping(y, grad, new)))
        loss = jnp.where(tree_isfinite(grad), jax.lax.stop_gradient(loss), jnp.nan)
        t_next = (1 + jnp.sqrt(1 + 4 * t**2)) / 2
        momentum = (t - 1) / t_next
        y = jax.tree.map(lambda n, w: n + momentum * (n - w), new, params)
        return new, (y, t_next, loss, norm)

    def stopping_test(self, fn, params, state, args):
        del fn, params, args
        assert state is not None
        _, _, loss, norm = state
        return loss, norm

    def residual(self, fn, params, grad, args):
        del fn
        return self._mapping(params, grad, self._forward_backward(params, grad, args))


class ProximalGradient(_AbstractProximalSolver):
    r"""Proximal gradient descent, accelerated (FISTA) by default, for
    $\min_w f(w, \lambda) + g(w, \lambda)$ where $f$ is the smooth `inner_loss` and $g$ enters
    through its proximal operator:
    $w_{t+1} = \operatorname{prox}_{\eta g}(w_t - \eta \nabla f(w_t, \lambda), \lambda)$.

    With [`bilevax.inner_solve`][] it stops when the gradient mapping
    $\|w - \operatorname{prox}_{\eta g}(w - \eta\nabla f)\| / \eta$ is at most `tol` (the
    gradient norm means nothing at a lasso solution); accelerated, the test is taken at the
    extrapolated point, where the step evaluated the gradient, and a step costs one gradient
    evaluation either way. [`bilevax.ImplicitAdjoint`][]
    differentiates the fixed point of the map: with $F(w, \lambda) = w - T(w, \lambda)$,
    $\mathrm{d}w^* = -(\partial_w F)^{-1} \partial_\lambda F\,\mathrm{d}\lambda$, a
    non-symmetric system (`lx.CG` is then run on the normal equations). Without `prox`
    ($g = 0$: accelerated gradient descent, jaxopt's `GradientDescent`) $F$ is $\nabla f$ and
    the system is the symmetric Hessian's. Unrolling ([`bilevax.UnrolledAdjoint`][],
    [`bilevax.unrolled_hypergrad`][]) differentiates the steps.

    **Arguments:**

    - `learning_rate`: the step $\eta$; $1/L$ for an $L$-smooth $f$ converges.
    - `prox`: `prox(x, hparams, scaling) -> x`, jaxopt's signature: the proximal operator of
        $\texttt{scaling}\cdot g(\cdot, \lambda)$, given the same `hparams` as `inner_loss`.
        [`bilevax.prox_lasso`][], [`bilevax.prox_elastic_net`][] and
        [`bilevax.prox_group_lasso`][] take the regularisation strengths as `hparams`
        directly; wrap them when `hparams` holds more, e.g.
        `lambda w, h, s: bx.prox_lasso(w, jnp.exp(h["log_l1"]), s)`. `None` (the default,
        as jaxopt's default `prox_none`; `jaxopt.prox.prox_none` itself is recognised too)
        is the identity: a smooth problem, whose residual is the gradient.
    - `acceleration`: Nesterov/FISTA momentum, at no extra gradient evaluation.
    """

    learning_rate: ArrayLike
    prox: Callable | None = None
    acceleration: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        check_real("learning_rate", self.learning_rate, lower=0, lower_open=True)
        if self.prox is not None:
            check_callable("prox", self.prox)

    @property
    def _identity_prox(self) -> bool:
        return self.prox is None or self.prox is _jaxopt_prox_none()

    def _prox(self, x, hparams):
        if self._identity_prox:
            return x
        assert self.prox is not None
        return self.prox(x, hparams, self.learning_rate)


def _jaxopt_prox_none() -> Callable | None:
    """`jaxopt.prox.prox_none`, if jaxopt is imported (a ported program may pass it)."""
    prox = sys.modules.get("jaxopt.prox")
    return getattr(prox, "prox_none", None)


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
