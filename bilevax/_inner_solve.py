import equinox as eqx
from jaxtyping import Array, PyTree

from ._adjoint import AbstractAdjoint, ImplicitAdjoint
from ._checks import (
    check_bool,
    check_callable,
    check_instance,
    check_int,
    check_nonnegative,
    check_scalar_loss,
    split_params,
)
from ._custom_types import Data, HParams, InnerLoss, Params
from ._iterate import InnerLoop
from ._misc import scalars_as_arrays
from ._solution import RESULTS, Solution
from ._solver import GradientDescent, SolverLike, as_inner_solver


def inner_solve(
    inner_loss: InnerLoss,
    init: Params,
    hparams: HParams,
    data: Data = None,
    *,
    solver: SolverLike = GradientDescent(0.1),
    max_steps: int = 1000,
    tol=1e-6,
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    throw: bool = False,
    solver_state: PyTree[Array] | None = None,
) -> Solution:
    r"""Approximately solves the inner problem $\min_w L(w, \lambda)$.

    Steps `solver` from `init` until $\|\nabla_w L\|_2 \le$ `tol` or `max_steps` steps.
    Under `jax.vmap` each task stops on its own test. The solution is differentiable with
    respect to `hparams` and `data` as `adjoint` says: by the implicit function theorem
    ([`bilevax.ImplicitAdjoint`][], the default) or through the steps
    ([`bilevax.UnrolledAdjoint`][], which always takes exactly `max_steps` steps).

    **Arguments:**

    - `inner_loss`: `(params, hparams, data) -> scalar`, the training objective $L$.
    - `init`: the initial parameters, a pytree (arrays, dicts, Equinox modules). Its
        floating-point arrays are optimised; other leaves are kept as they are.
    - `hparams`: the hyperparameters $\lambda$, any pytree.
    - `data`: any pytree passed to `inner_loss` (pass data here rather than closing over it,
        so that `jax.vmap` can map over tasks).
    - `solver`: a [`bilevax.GradientDescent`][], any `optax.GradientTransformation`, an
        `optimistix` minimiser (e.g. `optx.BFGS(rtol, atol)`), or a callable
        `hparams -> solver`.
    - `max_steps`: the most steps to take.
    - `tol`: stop once the 2-norm of the gradient (all leaves together) is at most this; for
        [`bilevax.ProximalGradient`][] and [`bilevax.ProjectedGradient`][], the 2-norm of the
        gradient mapping $(w - \operatorname{prox}_{\eta g}(w - \eta \nabla L))/\eta$.
    - `adjoint`: how to differentiate the solution: [`bilevax.ImplicitAdjoint`][] (the
        default), [`bilevax.UnrolledAdjoint`][], or an approximate one
        ([`bilevax.OneStepAdjoint`][], [`bilevax.FiniteDifferenceAdjoint`][],
        [`bilevax.SAMAAdjoint`][]; see "Approximate adjoints" in the docs).
    - `throw`: raise (through `eqx.error_if`) when the result is not successful.
    - `solver_state`: the `state` of an earlier solution with the same solver and parameter
        structure, to resume from: typically the previous outer step's, in a loop that
        also starts `init` at its `params`. The solver keeps what stays valid when the
        hyperparameters or data change ([`bilevax.AbstractInnerSolver.resume`][]): an
        `optimistix` quasi-Newton minimiser (`optx.LBFGS`, `optx.BFGS`) its curvature
        pairs or Hessian approximation, so that it does not rebuild them every outer step;
        loss values and gradients are always recomputed. Other solvers start afresh. The
        state is never differentiated. The first one in a loop is
        `inner_solve(..., max_steps=0).state`, which takes no step.

    **Returns:**

    A [`bilevax.Solution`][] with `params`, `result` ([`bilevax.RESULTS`][]), `stats`
    (`"num_steps"`, `"grad_norm"`) and the solver's final `state`. A solve that went
    non-finite returns NaN parameters (`RESULTS.nonfinite`), never its last finite iterate,
    and a NaN state; one cut short at `max_steps` returns its last iterate, flagged
    `RESULTS.max_steps_reached`.
    """
    check_callable("inner_loss", inner_loss)
    check_int("max_steps", max_steps, 0)
    check_nonnegative("tol", tol)
    check_instance(
        "adjoint",
        adjoint,
        AbstractAdjoint,
        "`bx.ImplicitAdjoint(...)`, `bx.UnrolledAdjoint(...)` or an approximate adjoint "
        "(`bx.OneStepAdjoint()`, `bx.FiniteDifferenceAdjoint()`, `bx.SAMAAdjoint(...)`)",
    )
    check_bool("throw", throw)
    float_init, static_init = split_params(init, "init")
    check_scalar_loss("inner_loss", inner_loss, init, hparams, data, "init")
    hparams, data = scalars_as_arrays((hparams, data))
    inner_solver = as_inner_solver(solver, hparams)
    # Arrays that `inner_loss` closes over become explicit, so the implicit adjoint can
    # differentiate with respect to them too.
    inner_loss = eqx.filter_closure_convert(inner_loss, init, hparams, data)
    loop = InnerLoop(inner_loss, static_init, inner_solver, max_steps, tol, solver_state)
    params, result, stats, state = adjoint.apply(loop, float_init, hparams, data)
    if throw:
        params = result.error_if(params, result != RESULTS.successful)
    return Solution(
        params=eqx.combine(params, static_init), result=result, stats=stats, state=state
    )
