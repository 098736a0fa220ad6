r"""Approximate adjoints: the derivative of an inner solution with $H^{-1}$ replaced by the
derivative of one step of the inner solver, at the point the solver returned.

With the solver's step $w \mapsto \varphi(w, \nabla_w L(w, \lambda))$ and a fixed point $w$,
the implicit function theorem gives
$\mathrm{d}w^*/\mathrm{d}\lambda = (I - \partial_w\varphi)^{-1}\,\partial_\lambda\varphi$; the
one-step (Jacobian-free) estimate keeps $\partial_\lambda\varphi = -P\,B$ and drops the
inverse, with $B = \partial^2_{w\lambda} L$ and $P = -\partial_g \varphi$ the step's
derivative with respect to the gradient ($\eta I$ for gradient descent, Adam's diagonal
preconditioner for Adam). In reverse mode this is the adjoint $v = P^\top \nabla_w E$ in place
of $H^{-1} \nabla_w E$, and the hypergradient is $\partial_\lambda E - B^\top v$: the
statement of the implicit hypergradient with an inexact adjoint, whose residual
$r = H v - \nabla_w E$ is what [`bilevax.diagnostics.hypergrad_info`][] turns into an error
estimate. DARTS and SAMA compute $B^\top v$ by a central finite difference of
$\nabla_\lambda L$ at $w \pm \varepsilon v$ instead of a second-order product.
"""

import abc
from typing import Any, ClassVar, cast

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._adjoint import AbstractAdjoint
from ._checks import check_real, check_same_structure
from ._forward import forward_value_and_grad
from ._ift import GradientOptimality, linearized_optimality
from ._iterate import InnerLoop
from ._misc import stop_gradient, tree_isfinite, tree_norm, tree_subtract, tree_where_nan
from ._solution import RESULTS, HypergradInfo
from ._solver import AbstractInnerSolver
from ._solver._base import _OptimistixSolver


class AbstractApproximateAdjoint(AbstractAdjoint):
    r"""An adjoint that replaces the implicit function theorem's $H^{-1}$ by the derivative
    of one solver step (see the module). The solver runs to `tol` without being traced for
    derivatives, as with [`bilevax.ImplicitAdjoint`][]; `attach` gives its output the
    approximate derivative, and `adjoint_vector` says which adjoint $v$ that derivative
    amounts to in reverse mode, for [`bilevax.implicit_hypergrad`][]'s info."""

    # Whether the derivative exists in forward mode (a finite difference of the
    # hyperparameter gradient is a reverse-mode construction: `jax.custom_vjp`).
    forward_mode: ClassVar[bool] = True

    def apply(self, loop, init, hparams, data):
        outcome = stop_gradient(loop).to_tolerance(
            stop_gradient(init), stop_gradient(hparams), stop_gradient(data)
        )
        params, result, stats, state = outcome
        params = self.attach(loop, params, state, hparams, data)
        return params, result, stats, state

    @abc.abstractmethod
    def attach(self, loop: InnerLoop, params, state, hparams, data) -> PyTree[Array]:
        """`params` (the solver's output, not differentiated) with this adjoint's derivative
        with respect to `hparams`, `data` and the arrays the loss closes over."""

    @abc.abstractmethod
    def adjoint_vector(self, loop: InnerLoop, params, state, inputs, cotangent) -> PyTree[Array]:
        r"""$v = P^\top u$ for the cotangent $u$ of `params` (in a hypergradient,
        $u = \nabla_w E$), with `inputs = (inner_loss, hparams, data)`."""


class OneStepAdjoint(AbstractApproximateAdjoint):
    r"""One-step (Jacobian-free) differentiation: the derivative of the solution is that of one
    more solver step from it, with the point and the solver state held fixed (Bolte, Pauwels
    & Vaiter 2023; Fung et al. 2022's Jacobian-free backpropagation):
    $\mathrm{d}w/\mathrm{d}\lambda \approx \partial_\lambda \varphi(w, \lambda)$. For gradient
    descent with step $\eta$ the adjoint is $v = \eta \nabla_w E$.

    Exact when $\partial_w \varphi = 0$ at the solution: Newton's method, or gradient
    descent on a quadratic with $H = I/\eta$. Otherwise its error is
    $-\partial_w\varphi \,\mathrm{d}w^*/\mathrm{d}\lambda$, small only where the step
    contracts strongly ($\|I - \eta H\| \ll 1$); on an ill-conditioned problem it is of the
    size of the hypergradient itself. Costs one product with the step's derivative (for
    gradient descent one mixed second-order product, no linear solve).

    Forward mode, reverse mode and their compositions all work (the step is differentiated
    by JAX), under `jax.jit` and `jax.vmap`, with bilevax's solvers and any optax
    transformation. An optimistix minimiser is refused (`TypeError`): its step moves along a
    direction computed at the previous step, so its derivative would be zero. Its
    [`bilevax.HypergradInfo`][] (through
    `implicit_hypergrad(..., adjoint=OneStepAdjoint(), solver=...)`) needs a solver whose
    step takes the gradient it is given: gradient descent, an optax transformation, ISTA.
    """

    def attach(self, loop, params, state, hparams, data):
        params, state = stop_gradient((params, state))
        stepped = _step(loop, params, state, (loop.inner_loss, hparams, data))
        # The value is exactly `params` (s - s = 0); the derivative is the step's.
        return jax.tree.map(lambda p, s: p + (s - jax.lax.stop_gradient(s)), params, stepped)

    def adjoint_vector(self, loop, params, state, inputs, cotangent):
        return _step_adjoint(loop, params, state, inputs, cotangent)


class FiniteDifferenceAdjoint(AbstractApproximateAdjoint):
    r"""DARTS' approximate hypergradient (Liu, Simonyan & Yang 2019, eqs. 7–8): the one-step
    adjoint $v = \xi \nabla_w E$, and the mixed product by a central finite difference,

    $$B^\top v \approx \frac{\nabla_\lambda L(w + \varepsilon v) -
      \nabla_\lambda L(w - \varepsilon v)}{2\varepsilon}, \qquad
      \varepsilon = \frac{\texttt{radius}}{\|v\|_2},$$

    two gradients and no second-order derivative (the point of DARTS: the memory of a first
    order method). $\xi$ is `learning_rate`; with the default `None` it is the inner solver's
    own step ($P$ of [`bilevax.OneStepAdjoint`][]: $\eta$ for gradient descent, Adam's
    preconditioner for `optax.adam`), so that this is the one-step estimate with the mixed
    product by finite differences. betty's `darts` is `learning_rate=1.0`. The difference is
    exact up to rounding where $\nabla_\lambda L$ is quadratic in $w$ (every penalty
    $e^\lambda \|w\|^2$), and $O(\varepsilon^2 \|v\|^2)$ otherwise.

    **Reverse mode only** (`jax.grad`, `jax.vjp`, under `jax.jit` and `jax.vmap`): the
    difference is not linear in $v$, so there is no forward-mode derivative to transpose, and
    `jax.jvp` through it raises JAX's "can't apply forward-mode autodiff (jvp) to a
    custom_vjp function". The gradient with respect to a solver that depends on the
    hyperparameters (a learned step size) is not included.

    **Arguments:**

    - `radius`: $\varepsilon \|v\|_2$, the size of the perturbation of $w$ (DARTS: 0.01).
    - `learning_rate`: $\xi$, or `None` for the inner solver's step.
    """

    radius: Any = 0.01
    learning_rate: Any = None
    forward_mode: ClassVar[bool] = False

    def __check_init__(self):
        check_real("radius", self.radius, lower=0, lower_open=True)
        if self.learning_rate is not None:
            check_real("learning_rate", self.learning_rate, lower=0, lower_open=True)

    def attach(self, loop, params, state, hparams, data):
        return _finite_difference(
            (loop.inner_loss, hparams, data), stop_gradient(params), self, loop, state
        )

    def adjoint_vector(self, loop, params, state, inputs, cotangent):
        if self.learning_rate is None:
            return _step_adjoint(loop, params, state, inputs, cotangent)
        return jax.tree.map(lambda u: self.learning_rate * u, cotangent)


class SAMAAdjoint(AbstractApproximateAdjoint):
    r"""SAMA's approximate hypergradient (Choe et al. 2023; betty's `sama` method): the
    identity for the inverse Hessian, corrected by the derivative of the base optimiser's
    update, and the mixed product by a central finite difference as in
    [`bilevax.FiniteDifferenceAdjoint`][] (with betty's default `radius=1.0`).

    For an Adam inner solver (`optax.adam(learning_rate, b1, b2, eps)`, whose state holds the
    moments $m$, $s$), the adjoint is $v = \eta\, d \odot \nabla_w E$ with betty's diagonal
    derivative of Adam's update $m'/(\sqrt{s'} + \epsilon)$ with respect to its gradient $g$,

    $$d = \frac{(1 - \beta_1)\beta_2\, s - \beta_1 (1 - \beta_2)\, g\, m}
               {(\sqrt{s'} + \epsilon)^3}, \qquad s' = \beta_2 s + (1 - \beta_2) g^2.$$

    Differences from betty, none of which matter at a converged solve: betty differentiates
    the last update it took (its moments before that update recovered from the stored
    gradient); here it is the next update from the returned state, at the gradient there. Both
    leave out Adam's bias correction and approximate
    $\sqrt{s'}(\sqrt{s'} + \epsilon)^2$ by $(\sqrt{s'} + \epsilon)^3$. betty falls back to the
    identity ($P = I$) for any optimiser that is not Adam: that is
    `FiniteDifferenceAdjoint(radius=1.0, learning_rate=1.0)`; here a solver that is not
    Adam is refused.

    **Reverse mode only**, as [`bilevax.FiniteDifferenceAdjoint`][].

    **Arguments:**

    - `learning_rate`, `b1`, `b2`, `eps`: those of the `optax.adam` inner solver (optax keeps
        them in closures, where they cannot be read).
    - `radius`: $\varepsilon \|v\|_2$ (betty's `sama_adam_alpha`, 1.0).
    """

    learning_rate: Any
    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-8
    radius: Any = 1.0
    forward_mode: ClassVar[bool] = False

    def __check_init__(self):
        check_real("learning_rate", self.learning_rate, lower=0, lower_open=True)
        check_real("b1", self.b1, lower=0, upper=1, upper_open=True)
        check_real("b2", self.b2, lower=0, upper=1, lower_open=True, upper_open=True)
        check_real("eps", self.eps, lower=0)
        check_real("radius", self.radius, lower=0, lower_open=True)

    def attach(self, loop, params, state, hparams, data):
        _adam_moments(state)  # refuse another solver at trace time, not in the backward pass
        return _finite_difference(
            (loop.inner_loss, hparams, data), stop_gradient(params), self, loop, state
        )

    def adjoint_vector(self, loop, params, state, inputs, cotangent):
        mu, nu = _adam_moments(state)
        grad = _gradient(loop, params, inputs)
        b1, b2 = self.b1, self.b2

        def leaf(u, g, m, s):
            s_next = b2 * s + (1 - b2) * g**2
            d = ((1 - b1) * b2 * s - b1 * (1 - b2) * g * m) / (jnp.sqrt(s_next) + self.eps) ** 3
            return self.learning_rate * d * u

        return jax.tree.map(leaf, cotangent, grad, mu, nu)


def _adam_moments(state) -> tuple[PyTree[Array], PyTree[Array]]:
    """The first and second moments of the one Adam state (optax's `ScaleByAdamState`) in a
    solver state."""
    is_adam = lambda x: hasattr(x, "mu") and hasattr(x, "nu") and hasattr(x, "count")
    found = [x for x in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(x)]
    if len(found) != 1:
        raise TypeError(
            "`SAMAAdjoint` needs an Adam inner solver (`solver=optax.adam(...)`, whose state "
            f"holds Adam's moments); the solver state holds {len(found)} Adam states. For "
            "another solver use `bx.FiniteDifferenceAdjoint` (betty's fallback for SGD is "
            "`FiniteDifferenceAdjoint(radius=1.0, learning_rate=1.0)`)."
        )
    return found[0].mu, found[0].nu


def _loss(loop: InnerLoop, inputs):
    inner_loss, hparams, data = inputs
    fn = lambda p, args: inner_loss(eqx.combine(p, loop.static_params), *args)
    return fn, (hparams, data)


def _gradient(loop: InnerLoop, params, inputs) -> PyTree[Array]:
    fn, args = _loss(loop, inputs)
    return jax.grad(fn)(params, args)


def _full_state(loop: InnerLoop, params, state, inputs):
    """The solver state from its arrays (`state`, as a solve returns it, or the solver's
    initial state where there is none)."""
    fn, args = _loss(loop, inputs)
    initial = loop.solver.init(fn, params, args)
    dynamic, static = eqx.partition(initial, eqx.is_array)
    if state is None:
        return initial
    check_same_structure("solver_state", state, dynamic, "the solver's state at `params_star`")
    return eqx.combine(state, static)


def _step(loop: InnerLoop, params, state, inputs) -> PyTree[Array]:
    """One solver step from `params`, a function of `inputs`."""
    if isinstance(loop.solver, _OptimistixSolver):
        # Its derivative would be zero, a plausible wrong number.
        raise TypeError(
            "`OneStepAdjoint` cannot differentiate a step of an optimistix minimiser: its step "
            "moves along the direction it computed at the previous step, so one step does not "
            "depend on the hyperparameters through the gradient at the solution. Use "
            "`bx.GradientDescent`, an optax transformation, or `bx.ImplicitAdjoint()` (which "
            "suits a quasi-Newton solve: `bx.QuasiNewtonPreconditioner`)."
        )
    fn, args = _loss(loop, inputs)
    full_state = _full_state(loop, params, state, inputs)
    grad = None if loop.solver.evaluates_own_gradient else jax.grad(fn)(params, args)
    return loop.solver.step(fn, params, grad, full_state, args)[0]


def _step_adjoint(loop: InnerLoop, params, state, inputs, cotangent) -> PyTree[Array]:
    r"""$P^\top u = -(\partial_g \varphi)^\top u$: the transposed derivative of one step with
    respect to the gradient it is given."""
    solver = loop.solver
    # An optimistix minimiser's step ignores the gradient it is given and evaluates its own.
    takes_gradient = not solver.evaluates_own_gradient and not isinstance(solver, _OptimistixSolver)
    if not takes_gradient:
        raise TypeError(
            f"the approximate adjoint's vector needs a solver whose step takes the gradient it "
            f"is given (gradient descent, an optax transformation, ISTA); "
            f"{type(solver).__name__} evaluates its own. Pass `learning_rate` to "
            "`FiniteDifferenceAdjoint`, or another `solver`."
        )
    fn, args = _loss(loop, inputs)
    full_state = _full_state(loop, params, state, inputs)
    grad = jax.grad(fn)(params, args)
    step = lambda g: solver.step(fn, params, g, full_state, args)[0]
    _, pullback = jax.vjp(step, grad)
    return jax.tree.map(jnp.negative, pullback(cotangent)[0])


def _finite_difference_mixed(loop: InnerLoop, params, inputs, v, radius, perturbed):
    r"""$B^\top v$ for every differentiated array of `inputs` (the hyperparameters, the data,
    the arrays the loss closes over), by a central difference of their gradient at
    $w \pm \varepsilon v$ with $\varepsilon = \texttt{radius}/\|v\|_2$ (DARTS)."""
    norm = tree_norm(v)
    # A zero adjoint has a zero product: any finite ε gives it.
    eps = jnp.where(norm > 0, radius / jnp.where(norm > 0, norm, 1), 1).astype(norm.dtype)
    diff_inputs, static_inputs = eqx.partition(inputs, perturbed)

    def input_grad(sign):
        shifted = jax.tree.map(lambda w, d: w + sign * eps * d, params, v)

        def loss(diff):
            fn, args = _loss(loop, eqx.combine(diff, static_inputs))
            return fn(shifted, args)

        return jax.grad(loss)(diff_inputs)

    plus, minus = input_grad(1.0), input_grad(-1.0)
    return jax.tree.map(lambda p, m: (p - m) / (2 * eps), plus, minus)


@eqx.filter_custom_vjp
def _finite_difference(inputs, params, adjoint, loop, state):
    del inputs, adjoint, loop, state
    return params


_finite_difference = cast(Any, _finite_difference)


@_finite_difference.def_fwd
def _finite_difference_fwd(perturbed, inputs, params, adjoint, loop, state):
    del perturbed, inputs, adjoint, loop, state
    return params, None


@_finite_difference.def_bwd
def _finite_difference_bwd(residuals, cotangent, perturbed, inputs, params, adjoint, loop, state):
    del residuals
    # An output that was not differentiated has a `None` cotangent; a non-array part of the
    # parameters (an Equinox module's activation) is `None` in both.
    cotangent = jax.tree.map(
        lambda c, p: c if c is not None or p is None else jnp.zeros_like(p),
        cotangent,
        params,
        is_leaf=lambda x: x is None,
    )
    v = adjoint.adjoint_vector(loop, params, state, inputs, cotangent)
    mixed = _finite_difference_mixed(loop, params, inputs, v, adjoint.radius, perturbed)
    return jax.tree.map(jnp.negative, mixed)


def approximate_hypergrad(
    adjoint: AbstractApproximateAdjoint,
    outer_loss,
    inner_loss,
    params_star,
    hparams,
    data,
    solver: AbstractInnerSolver,
    solver_state,
    *,
    mode: str,
    tol: Any,
    has_aux: bool,
):
    """`(value, hypergrad, info)` of [`bilevax.implicit_hypergrad`][] with an approximate
    `adjoint`: the hypergradient of `outer_loss` through the solution with the adjoint's
    derivative attached, and (with `has_aux`) a [`bilevax.HypergradInfo`][] whose `adjoint`
    is the approximate $v$ and whose `residual_norm` is $\\|Hv - \\nabla_w E\\|_2$, which
    [`bilevax.diagnostics.hypergrad_info`][] turns into an error estimate. `info` is `None`
    without `has_aux`. The arguments are checked."""
    inner_data, outer_data = data
    float_params, static_params = eqx.partition(params_star, eqx.is_inexact_array)
    converted = eqx.filter_closure_convert(inner_loss, params_star, hparams, inner_data)
    loop = InnerLoop(converted, static_params, solver, 0, tol, solver_state)
    state = solver_state

    def objective(hparams):
        params = adjoint.attach(loop, float_params, state, hparams, inner_data)
        return outer_loss(eqx.combine(params, static_params), hparams, outer_data)

    if mode == "reverse":
        value, hypergrad = eqx.filter_value_and_grad(objective)(hparams)
    else:
        value, hypergrad = forward_value_and_grad(objective, hparams)
    inputs = (converted, hparams, inner_data)
    optimality = GradientOptimality(static_params)
    inner_grad, hessian = linearized_optimality(optimality, float_params, inputs, symmetric=True)
    inner_grad_norm = tree_norm(inner_grad)
    # A point where the inner loss is not finite has no derivative; the estimate's formula
    # may not read the failing part (DARTS' ∇_λL of a ridge penalty never sees the data), so
    # its number would be plausible and wrong.
    hypergrad = tree_where_nan(~jnp.isfinite(inner_grad_norm), hypergrad)
    if not has_aux:
        return value, hypergrad, None

    def outer_w(w):
        return outer_loss(eqx.combine(w, static_params), hparams, outer_data)

    outer_grad = jax.grad(outer_w)(float_params)
    v = adjoint.adjoint_vector(loop, float_params, state, inputs, outer_grad)
    residual_norm = tree_norm(tree_subtract(hessian.mv(v), outer_grad))
    result = RESULTS.where(inner_grad_norm <= tol, RESULTS.successful, RESULTS.not_stationary)
    finite = tree_isfinite(hypergrad) & tree_isfinite(v) & jnp.isfinite(value)
    result = RESULTS.where(finite & jnp.isfinite(inner_grad_norm), result, RESULTS.nonfinite)
    info = HypergradInfo(
        result=result,
        inner_grad_norm=inner_grad_norm,
        residual_norm=residual_norm,
        solve_steps=jnp.zeros((), int),
        adjoint=v,
    )
    return value, hypergrad, info
