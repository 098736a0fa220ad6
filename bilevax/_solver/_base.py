import abc
import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeGuard, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, PyTree, Scalar

from .._checks import check_real
from .._custom_types import HParams


# optax and optimistix are imported by the user who passes their solvers, never by
# `import bilevax` (they take a tenth of its import time): an optax or optimistix object can only
# exist once its package is imported, so `sys.modules` tells whether a solver may be one.
if TYPE_CHECKING:
    import optax
    import optimistix as optx


def _is_optax(solver) -> TypeGuard["optax.GradientTransformation"]:
    optax = sys.modules.get("optax")
    return optax is not None and isinstance(solver, optax.GradientTransformation)


def _is_optimistix(solver) -> TypeGuard["optx.AbstractMinimiser"]:
    optx = sys.modules.get("optimistix")
    return optx is not None and isinstance(solver, optx.AbstractMinimiser)


_State = TypeVar("_State")
Loss = Callable[[PyTree[Array], Any], Scalar]


class AbstractInnerSolver(eqx.Module, Generic[_State]):
    """Base class of the iterative solvers used by [`bilevax.inner_solve`][] and
    [`bilevax.unrolled_hypergrad`][].

    A solver sees a loss `fn(params, args) -> scalar` on a pytree of floating-point arrays,
    and the gradient at the current point (the driver computes it once per step, for the
    stopping test too), unless it `evaluates_own_gradient`. Its state is returned, never
    mutated, so that steps can be scanned, differentiated and vmapped.
    """

    @abc.abstractmethod
    def init(self, fn: Loss, params: PyTree[Array], args: Any) -> _State:
        """The solver state before the first step."""

    @abc.abstractmethod
    def step(
        self,
        fn: Loss,
        params: PyTree[Array],
        grad: PyTree[Array],
        state: _State,
        args: Any,
    ) -> tuple[PyTree[Array], _State]:
        """One step from `params`, where `grad = ∇fn(params, args)` (`None` for a solver that
        `evaluates_own_gradient`); returns `(params, state)`."""

    # Whether `step` evaluates the gradient it needs itself, at a point of its own (FISTA's
    # extrapolated point) rather than at `params`: the driver then passes it `grad=None` and
    # stops on `stopping_test`, so that a step costs one gradient evaluation, not two.
    evaluates_own_gradient: ClassVar[bool] = False

    def stopping_test(
        self, fn: Loss, params: PyTree[Array], state: _State, args: Any
    ) -> tuple[Scalar, Scalar]:
        """For a solver that `evaluates_own_gradient`: `(loss, residual_norm)` at the point
        where the `step` that returned `(params, state)` evaluated the gradient, the loss NaN
        where that gradient was not finite. The driver's loop stops once the norm is at most
        `tol` (or either is not finite); the result is then judged at the returned `params`,
        with one more gradient evaluation."""
        raise NotImplementedError(
            f"{type(self).__name__} sets `evaluates_own_gradient` and must define `stopping_test`."
        )

    def resume(self, fn: Loss, params: PyTree[Array], args: Any, state: _State) -> _State:
        """The state to start from at `params`, given the final `state` of an earlier solve
        of a related problem: the same loss at other hyperparameters or data (the previous
        outer step). It keeps what stays valid there, curvature information, and drops what
        does not: loss values and gradients, which belong to the old problem. The default
        keeps nothing (`init`); quasi-Newton minimisers keep their curvature pairs."""
        del state
        return self.init(fn, params, args)

    def inverse_hessian(self, state: _State) -> lx.AbstractLinearOperator | None:
        """The solver's approximation of the inverse Hessian at its last point, a positive
        definite operator, if it keeps one (quasi-Newton methods); `None` otherwise."""
        del state
        return None

    def value_and_grad(
        self, fn: Loss, params: PyTree[Array], state: _State, args: Any
    ) -> tuple[Scalar, PyTree[Array]]:
        """`(fn(params, args), ∇fn(params, args))` after a `step` returned `(params, state)`:
        the driver's stopping test. The default evaluates them; a solver whose step already
        did (a quasi-Newton method evaluates at the point it accepts) returns what it holds."""
        del state
        return jax.value_and_grad(fn)(params, args)

    # Whether `residual` is the gradient itself, so that the implicit adjoint may use the
    # symmetric Hessian; solvers of constrained or non-smooth problems set it to False.
    residual_is_gradient: ClassVar[bool] = True

    def residual(
        self, fn: Loss, params: PyTree[Array], grad: PyTree[Array], args: Any
    ) -> PyTree[Array]:
        """A residual `F(params, args)` with the structure of `params`, zero exactly at a
        solution: its norm is the stopping test of [`bilevax.inner_solve`][], and its
        Jacobian the linear system of [`bilevax.ImplicitAdjoint`][]. `grad = ∇fn(params, args)`.
        The default is the gradient; a proximal solver returns its gradient mapping."""
        del fn, params, args
        return grad


class GradientDescent(AbstractInnerSolver[PyTree[Array]]):
    r"""Gradient descent with optional heavy-ball momentum:
    $v_{t+1} = \mu v_t + \nabla L(w_t)$, $w_{t+1} = w_t - \eta v_{t+1}$.

    With `momentum=0` this is exactly $w_{t+1} = w_t - \eta \nabla L(w_t)$. Both
    `learning_rate` and `momentum` may be traced arrays (for instance a learned step size,
    as in Franceschi et al. 2018), so they can be hyperparameters.

    **Arguments:**

    - `learning_rate`: the step size $\eta$.
    - `momentum`: the momentum $\mu \in [0, 1)$.
    """

    learning_rate: ArrayLike
    momentum: ArrayLike = 0.0

    def __check_init__(self):
        check_real("learning_rate", self.learning_rate, lower=0, lower_open=True, scalar=False)
        check_real("momentum", self.momentum, lower=0, upper=1, upper_open=True, scalar=False)

    def init(self, fn, params, args):
        del fn, args
        for name in ("learning_rate", "momentum"):
            shape = jnp.shape(getattr(self, name))
            for leaf in jax.tree.leaves(params):
                try:
                    fits = jnp.broadcast_shapes(shape, leaf.shape) == leaf.shape
                except ValueError:
                    fits = False
                if not fits:
                    raise ValueError(
                        f"`{name}` must be a scalar or broadcast to every parameter's shape; "
                        f"got shape {shape} for a parameter of shape {leaf.shape}."
                    )
        return jax.tree.map(jnp.zeros_like, params)

    def step(self, fn, params, grad, state, args):
        del fn, args
        velocity = jax.tree.map(lambda v, g: self.momentum * v + g, state, grad)
        params = jax.tree.map(lambda w, v: w - self.learning_rate * v, params, velocity)
        return params, velocity


class _OptaxSolver(AbstractInnerSolver[Any]):
    """Any `optax.GradientTransformation`, stepped on the driver's gradient."""

    optimizer: "optax.GradientTransformation"

    def init(self, fn, params, args):
        del fn, args
        return self.optimizer.init(params)

    def step(self, fn, params, grad, state, args):
        del fn, args
        # Some optax transformations (Adam's bias correction) mix an int32 step count with
        # floats, which a user's `jax_numpy_dtype_promotion="strict"` would refuse.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = self.optimizer.update(grad, state, params)
        return sys.modules["optax"].apply_updates(params, updates), state


class _OptimistixSolver(AbstractInnerSolver[Any]):
    """An `optimistix` minimiser, stepped through its `init`/`step` interface.

    The driver's stopping test ($\\|\\nabla L\\| \\le$ `tol`) replaces the minimiser's own, so
    that every solver stops on the same criterion.
    """

    minimiser: "optx.AbstractMinimiser"

    def init(self, fn, params, args):
        # `filter_eval_shape`, not `jax.eval_shape`: the latter turns Python numbers in `args`
        # into abstract arrays, and the closure-converted loss refuses other arguments than
        # it was traced with.
        loss_struct = eqx.filter_eval_shape(fn, params, args)
        return self.minimiser.init(_with_aux(fn), params, args, {}, loss_struct, None, frozenset())

    def step(self, fn, params, grad, state, args):
        del grad
        params, state, _ = self.minimiser.step(_with_aux(fn), params, args, {}, state, frozenset())
        return params, state

    def resume(self, fn, params, args, state):
        # A quasi-Newton minimiser's (inverse) Hessian approximation is its curvature pairs
        # (L-BFGS) or a dense matrix (BFGS): they describe the loss near the old solution,
        # which is the best guess at the new one's. Everything else starts afresh: the loss
        # and gradient in `f_info` are the old problem's, and `first_step` makes the first
        # step accept the new starting point without comparing it with the old loss.
        optx = sys.modules["optimistix"]
        fresh = self.init(fn, params, args)
        if not isinstance(self.minimiser, optx.AbstractQuasiNewton):
            return fresh
        old_info, info = state.f_info, fresh.f_info
        if isinstance(info, optx.FunctionInfo.EvalGradHessianInv):
            info = dataclasses.replace(info, hessian_inv=old_info.hessian_inv)
        elif isinstance(info, optx.FunctionInfo.EvalGradHessian):
            info = dataclasses.replace(info, hessian=old_info.hessian)
        else:  # a quasi-Newton method of another kind: nothing known to carry
            return fresh
        return dataclasses.replace(
            fresh, f_info=info, hessian_update_state=state.hessian_update_state
        )

    def inverse_hessian(self, state):
        # Only a quasi-Newton minimiser that approximates the inverse (`use_inverse=True`, the
        # default) has one to apply; one that approximates the Hessian would need a solve.
        optx = sys.modules["optimistix"]
        if not isinstance(self.minimiser, optx.AbstractQuasiNewton):
            return None
        info = state.f_info
        if not isinstance(info, optx.FunctionInfo.EvalGradHessianInv):
            return None
        return info.hessian_inv

    def value_and_grad(self, fn, params, state, args):
        # optimistix's minimisers evaluate the loss and gradient at each point they accept and
        # keep them in `state.f_info`, at the `params` their step returns (a rejected step
        # returns the last accepted point and its `f_info`). Evaluating them again would double
        # the cost of an iteration: XLA cannot merge the two evaluations, which are different
        # graphs. Minimisers without a gradient there are evaluated as usual.
        f_info = getattr(state, "f_info", None)
        grad = getattr(f_info, "grad", None)
        if f_info is None or grad is None or jax.tree.structure(grad) != jax.tree.structure(params):
            return super().value_and_grad(fn, params, state, args)
        return f_info.f, grad


def _with_aux(fn: Loss):
    return lambda params, args: (fn(params, args), None)


if TYPE_CHECKING:
    SolverLike = (
        AbstractInnerSolver
        | optax.GradientTransformation
        | optx.AbstractMinimiser
        | Callable[[HParams], Any]
    )
else:  # the same at run time, without importing optax and optimistix to say so
    SolverLike = AbstractInnerSolver | Callable[[HParams], Any]


def check_solver(solver: SolverLike) -> None:
    """The checks of `as_inner_solver` that need no hyperparameters, at construction time: a
    callable `hparams -> solver` is not called (it may need real hyperparameters)."""
    direct = isinstance(solver, AbstractInnerSolver) or _is_optax(solver) or _is_optimistix(solver)
    learned_step = callable(solver) and not (isinstance(solver, type) or direct)
    if not learned_step or _is_factory(solver):
        as_inner_solver(solver, None)


def as_inner_solver(solver: SolverLike, hparams: HParams) -> AbstractInnerSolver:
    """Turns the `solver` argument of the primitives into an [`AbstractInnerSolver`][].

    A callable that is not itself a solver is called on `hparams` first (a learned step size).
    A class, or an optax factory such as `optax.adam`, is refused: passed uncalled, it would
    take the hyperparameters for its learning rate.
    """
    if isinstance(solver, type):
        raise TypeError(
            f"`solver` must be a solver instance, e.g. `{solver.__name__}(...)`, not the class "
            f"{solver.__name__} itself."
        )
    if _is_factory(solver):
        name = getattr(solver, "__name__", repr(solver))
        raise TypeError(
            f"`solver` is the factory `{solver.__module__}.{name}`, not an optimiser: call it "
            f"(e.g. `optax.{name}(1e-2)`). A learned step size is a `lambda hparams: ...`."
        )
    if not isinstance(solver, AbstractInnerSolver) and not _is_optax(solver):
        if not _is_optimistix(solver) and callable(solver):
            solver = solver(hparams)
    if isinstance(solver, AbstractInnerSolver):
        return solver
    if _is_optimistix(solver):
        return _OptimistixSolver(solver)
    if _is_optax(solver):
        return _OptaxSolver(solver)
    raise TypeError(
        "`solver` must be a `bilevax.GradientDescent` (or another `bilevax.AbstractInnerSolver`), "
        "an `optax.GradientTransformation`, an `optimistix` minimiser, or a callable "
        f"`hparams -> solver` returning one of those; got {type(solver).__name__}."
    )


def _is_factory(solver) -> bool:
    module = getattr(solver, "__module__", None) or ""
    return inspect.isfunction(solver) and module.split(".")[0] in ("optax", "optimistix")
