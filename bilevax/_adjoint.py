import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from ._checks import check_bool, check_int, check_linear_solver
from ._custom_types import Data, HParams
from ._ift import general_solver, implicit_solution, optimality_for
from ._iterate import result_from, solve_to_tolerance, unroll
from ._linear_solver import default_linear_solver
from ._misc import stop_gradient, tree_norm, tree_where_nan
from ._solution import RESULTS
from ._solver import AbstractInnerSolver


class AbstractAdjoint(eqx.Module):
    """How [`bilevax.inner_solve`][] differentiates its solution with respect to `hparams`."""

    @abc.abstractmethod
    def solve(
        self,
        inner_loss,
        init: PyTree[Array],
        hparams: HParams,
        data: Data,
        solver: AbstractInnerSolver,
        max_steps: int,
        tol: Any,
        static_params: PyTree,
        solver_state: PyTree[Array] | None = None,
    ) -> tuple[PyTree[Array], RESULTS, dict[str, Array], PyTree[Array]]:
        """Runs the solver from `init` (the floating-point part of the parameters; the rest is
        `static_params`), resuming `solver_state` if given, and returns
        `(params, result, stats, state)`: `params` differentiable as this adjoint says, and
        the array part of the final solver state, not differentiated."""


class ImplicitAdjoint(AbstractAdjoint):
    r"""Differentiate the inner solution by the implicit function theorem.

    The solver runs without being traced for derivatives (a `while_loop` that stops at
    `tol`); the derivative of its output is
    $\mathrm{d}w^* = -H^{-1}\,\partial_\lambda \nabla_w L\,\mathrm{d}\lambda$, attached with
    `jax.custom_jvp`. Forward mode (`jax.jvp`, `jax.jacfwd`), reverse mode (`jax.grad`) and
    their compositions (`jax.hessian`) all work. Exact at an exact minimiser; its error grows
    with the final gradient norm, so keep `tol` small. With a [`bilevax.ProximalGradient`][]
    or [`bilevax.ProjectedGradient`][] solver the condition is the solver's fixed point
    instead of $\nabla_w L = 0$, whose Jacobian is not symmetric: CG and `lx.Cholesky`
    then run on the normal equations.

    **Arguments:**

    - `linear_solver`: any `lineax` solver for $H x = b$, or [`bilevax.Neumann`][];
        wrap it in [`bilevax.Preconditioned`][] to precondition it. The default (`None`) is
        [`bilevax.CG`][] with relative tolerance the inner solve's `tol` (never below
        $10^{-10}$ in float64, $10^{-5}$ in float32), so the derivative is as accurate as the
        solution it differentiates. `lx.GMRES` or `lx.BiCGStab` suit an indefinite Hessian;
        `lx.LU()` or `lx.Cholesky()` a small one (they form $H$).
    - `throw`: whether a failed linear solve (tolerance not reached, breakdown, a non-finite
        system) raises when the derivative is computed (the default), or gives NaN
        derivatives (an approximate one for a solve cut short at its `max_steps`).
    """

    linear_solver: lx.AbstractLinearSolver | None = None
    throw: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.linear_solver is not None:
            check_linear_solver(self.linear_solver)
        check_bool("throw", self.throw)

    def solve(
        self,
        inner_loss,
        init,
        hparams,
        data,
        solver,
        max_steps,
        tol,
        static_params,
        solver_state=None,
    ):
        loss = _flat_loss(stop_gradient(inner_loss), static_params)
        params, result, stats, state = solve_to_tolerance(
            loss,
            stop_gradient(init),
            stop_gradient((hparams, data)),
            stop_gradient(solver),
            max_steps,
            tol,
            stop_gradient(solver_state),
        )
        optimality, inputs, symmetric = optimality_for(
            solver, static_params, inner_loss, hparams, data
        )
        linear_solver = self.linear_solver
        if linear_solver is None:
            linear_solver = default_linear_solver(params, tol)
        if not symmetric:
            linear_solver = general_solver(linear_solver)
        params = implicit_solution(
            params,
            optimality,
            inputs,
            linear_solver,
            symmetric=symmetric,
            throw=self.throw,
            inner_failed=result != RESULTS.successful,
        )
        return params, result, stats, state


class UnrolledAdjoint(AbstractAdjoint):
    r"""Differentiate through the solver's steps: exactly `max_steps` of them, with no early
    stop, so the derivative is that of the $T$-step map $\lambda \mapsto w_T(\lambda)$
    (Franceschi et al. 2017). Forward and reverse mode both work.

    **Arguments:**

    - `checkpoints`: `None` stores every step for the backward pass (memory $O(T)$). An int
        $k$ stores the state at $k$ evenly spaced steps and recomputes the steps in between
        during the backward pass: one extra forward pass, memory $O(k + T/k)$
        ($O(\sqrt{T})$ at $k = \sqrt{T}$).
    - `truncate`: differentiate through the last `truncate` steps only (truncated
        back-propagation, Shaban et al. 2019); `None` for all of them.
    """

    checkpoints: int | None = eqx.field(static=True, default=None)
    truncate: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_checkpoints(self.checkpoints)
        if self.truncate is not None:
            check_int("truncate", self.truncate, 1)

    def solve(
        self,
        inner_loss,
        init,
        hparams,
        data,
        solver,
        max_steps,
        tol,
        static_params,
        solver_state=None,
    ):
        loss = _flat_loss(inner_loss, static_params)
        args = (hparams, data)
        # A carried state is a warm start, not a function of these hyperparameters.
        params, state = unroll(
            loss,
            init,
            args,
            solver,
            max_steps,
            checkpoints=self.checkpoints,
            truncate=self.truncate,
            solver_state=stop_gradient(solver_state),
        )
        final_loss, grad = jax.value_and_grad(loss)(stop_gradient(params), stop_gradient(args))
        grad_norm = tree_norm(
            solver.residual(loss, stop_gradient(params), grad, stop_gradient(args))
        )
        result = result_from(final_loss, grad, grad_norm, tol)
        # A diverged unroll is a failure, not an approximation: its parameters become NaN.
        failed = result == RESULTS.nonfinite
        params = tree_where_nan(failed, params)
        state = tree_where_nan(failed, stop_gradient(state))
        stats = {"num_steps": jnp.asarray(max_steps), "grad_norm": grad_norm}
        return params, result, stats, state


def _flat_loss(inner_loss, static_params):
    """`inner_loss` as `(float_params, (hparams, data)) -> scalar`, the solvers' signature."""
    return lambda params, args: inner_loss(eqx.combine(params, static_params), *args)


def check_checkpoints(checkpoints) -> None:
    if checkpoints is not None and (
        isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1
    ):
        raise ValueError(f"`checkpoints` must be None or a positive int, got {checkpoints!r}.")
