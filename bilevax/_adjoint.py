import abc

import equinox as eqx
import lineax as lx

from ._checks import check_bool, check_int, check_linear_solver
from ._custom_types import Data, HParams
from ._ift import default_linear_solver, general_solver, implicit_solution
from ._iterate import Checkpoints, InnerLoop, Outcome
from ._misc import stop_gradient
from ._solution import RESULTS


class AbstractAdjoint(eqx.Module):
    """How [`bilevax.inner_solve`][] differentiates its solution with respect to `hparams`:
    which of the loop driver's loops runs, and how its output is differentiated."""

    @abc.abstractmethod
    def apply(self, loop: InnerLoop, init, hparams: HParams, data: Data) -> Outcome:
        """Runs `loop` from `init` (the floating-point part of the parameters) and returns its
        `(params, result, stats, state)`, with `params` differentiable as this adjoint says
        (the state is never differentiated)."""


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

    def apply(self, loop, init, hparams, data):
        outcome = stop_gradient(loop).to_tolerance(
            stop_gradient(init), stop_gradient(hparams), stop_gradient(data)
        )
        params, result, stats, state = outcome
        optimality, inputs, symmetric = loop.optimality(hparams, data)
        linear_solver = self.linear_solver
        if linear_solver is None:
            linear_solver = default_linear_solver(params, loop.tol)
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

    - `checkpoints`: how the steps are stored for the backward pass.
        - `None` stores every step: memory $O(T)$, no recomputation.
        - An int $k$ stores the state at $k$ evenly spaced steps and recomputes the steps in
            between during the backward pass: one extra forward pass, memory $O(k + T/k)$
            ($O(\sqrt{T})$ at $k = \sqrt{T}$).
        - `"recursive"` nests such levels (recursive checkpointing, Griewank 1992): the
            steps are split into 8 segments, each segment into 8 more, and so on down to
            single steps, and the backward pass recomputes a segment from its start
            whenever it needs its states. Memory $O(\log T)$: $\lfloor\log_8 T\rfloor + 1$
            levels of at most 16 states each, plus one step's intermediates; each step runs
            forward at most $\lfloor\log_8 T\rfloor + 1$ times (5 at $T = 10^4$, 6 at
            $T = 10^5$).
            Plain `jax.checkpoint` and `lax.scan`, so forward mode and `jax.vmap` work;
            the nested loops take about three times as long to compile.

        All three give the same derivative, to rounding; [the scaling
        guide](../scaling.md#memory-of-unrolls) has measured memory and time.
    - `truncate`: differentiate through the last `truncate` steps only (truncated
        back-propagation, Shaban et al. 2019); `None` for all of them.
    """

    checkpoints: Checkpoints = eqx.field(static=True, default=None)
    truncate: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_checkpoints(self.checkpoints)
        if self.truncate is not None:
            check_int("truncate", self.truncate, 1)

    def apply(self, loop, init, hparams, data):
        return loop.unrolled(init, hparams, data, self.checkpoints, self.truncate)


def check_checkpoints(checkpoints) -> None:
    if checkpoints is None or (isinstance(checkpoints, str) and checkpoints == "recursive"):
        return
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
        raise ValueError(
            f'`checkpoints` must be None, a positive int or "recursive", got {checkpoints!r}.'
        )
