import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from ._checks import check_linear_solver
from ._custom_types import Data, HParams
from ._implicit_jvp import implicit_solution
from ._loops import result_from, solve_to_tolerance, unroll
from ._misc import stop_gradient, tree_norm
from ._solution import RESULTS
from ._solvers import AbstractInnerSolver


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
    ) -> tuple[PyTree[Array], RESULTS, dict[str, Array]]:
        """Runs the solver from `init` (the floating-point part of the parameters; the rest is
        `static_params`) and returns `(params, result, stats)`, differentiable as this
        adjoint says."""


class ImplicitAdjoint(AbstractAdjoint):
    r"""Differentiate the inner solution by the implicit function theorem.

    The solver runs without being traced for derivatives (a `while_loop` that stops at
    `tol`); the derivative of its output is
    $\mathrm{d}w^* = -H^{-1}\,\partial_\lambda \nabla_w L\,\mathrm{d}\lambda$, attached with
    `jax.custom_jvp`. Forward mode (`jax.jvp`, `jax.jacfwd`), reverse mode (`jax.grad`) and
    their compositions (`jax.hessian`) all work. Exact at an exact minimiser; its error grows
    with the final gradient norm, so keep `tol` small. With a [`bilevax.ProximalGradient`][]
    or [`bilevax.ProjectedGradient`][] solver the condition is the solver's fixed point
    instead of $\nabla_w L = 0$, whose Jacobian is not symmetric: `lx.CG` and `lx.Cholesky`
    then run on the normal equations.

    **Arguments:**

    - `linear_solver`: any `lineax` solver for $H x = b$, or [`bilevax.Neumann`][]. `lx.CG`
        (the default) suits a positive definite Hessian; `lx.GMRES` or `lx.BiCGStab` an
        indefinite one; `lx.LU()` or `lx.Cholesky()` a small one (they form $H$).
    """

    linear_solver: lx.AbstractLinearSolver = lx.CG(rtol=1e-6, atol=1e-6)

    def __check_init__(self):
        check_linear_solver(self.linear_solver)

    def solve(self, inner_loss, init, hparams, data, solver, max_steps, tol, static_params):
        loss = _flat_loss(stop_gradient(inner_loss), static_params)
        params, result, stats = solve_to_tolerance(
            loss,
            stop_gradient(init),
            stop_gradient((hparams, data)),
            stop_gradient(solver),
            max_steps,
            tol,
        )
        params = implicit_solution(
            params,
            inner_loss,
            hparams,
            data,
            self.linear_solver,
            static_params=static_params,
            solver=solver,
        )
        return params, result, stats


class UnrolledAdjoint(AbstractAdjoint):
    r"""Differentiate through the solver's steps: exactly `max_steps` of them, with no early
    stop, so the derivative is that of the $T$-step map $\lambda \mapsto w_T(\lambda)$
    (Franceschi et al. 2017). Forward and reverse mode both work.

    **Arguments:**

    - `checkpoints`: `None` stores every step for the backward pass (memory $O(T)$). An int
        $k$ stores the state at $k$ evenly spaced steps and recomputes the steps in between
        during the backward pass: one extra forward pass, memory $O(k + T/k)$
        ($O(\sqrt{T})$ at $k = \sqrt{T}$).
    """

    checkpoints: int | None = None

    def __check_init__(self):
        check_checkpoints(self.checkpoints)

    def solve(self, inner_loss, init, hparams, data, solver, max_steps, tol, static_params):
        loss = _flat_loss(inner_loss, static_params)
        args = (hparams, data)
        params = unroll(loss, init, args, solver, max_steps, checkpoints=self.checkpoints)
        final_loss, grad = jax.value_and_grad(loss)(stop_gradient(params), stop_gradient(args))
        grad_norm = tree_norm(
            solver.residual(loss, stop_gradient(params), grad, stop_gradient(args))
        )
        result = result_from(final_loss, grad, grad_norm, tol)
        return params, result, {"num_steps": jnp.asarray(max_steps), "grad_norm": grad_norm}


def _flat_loss(inner_loss, static_params):
    """`inner_loss` as `(float_params, (hparams, data)) -> scalar`, the solvers' signature."""
    return lambda params, args: inner_loss(eqx.combine(params, static_params), *args)


def check_checkpoints(checkpoints) -> None:
    if checkpoints is not None and (
        isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1
    ):
        raise ValueError(f"`checkpoints` must be None or a positive int, got {checkpoints!r}.")
