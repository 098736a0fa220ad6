from typing import Any, Literal, cast

import equinox as eqx
import jax
import lineax as lx
from jaxtyping import Array, PyTree

from ._approximate import AbstractApproximateAdjoint, approximate_hypergrad
from ._checks import (
    check_bool,
    check_callable,
    check_hparams,
    check_instance,
    check_linear_solver,
    check_mode,
    check_nonnegative,
    check_same_structure,
    check_scalar_loss,
    split_params,
)
from ._custom_types import Data, HParams, InnerLoss, OuterLoss, Params
from ._forward import forward_value_and_grad
from ._hypergrad import adjoint_hypergrad
from ._ift import GradientOptimality, default_linear_solver, implicit_solution, stationarity_tol
from ._solution import HypergradInfo
from ._solver import SolverLike, as_inner_solver


def implicit_hypergrad(
    outer_loss: OuterLoss,
    inner_loss: InnerLoss,
    params_star: Params,
    hparams: HParams,
    inner_data: Data = None,
    outer_data: Data = None,
    *,
    linear_solver: lx.AbstractLinearSolver | None = None,
    mode: Literal["reverse", "forward"] = "reverse",
    has_aux: bool = False,
    adjoint_init: Params | None = None,
    throw: bool = True,
    tol=None,
    adjoint: AbstractApproximateAdjoint | None = None,
    solver: SolverLike | None = None,
    solver_state: PyTree[Array] | None = None,
) -> tuple[jax.Array, HParams] | tuple[jax.Array, HParams, HypergradInfo]:
    r"""Hypergradient of `outer_loss` at a solution of the inner problem, by the implicit
    function theorem (Bengio 2000; Pedregosa 2016; Lorraine et al. 2020):

    $$\frac{\mathrm{d}E}{\mathrm{d}\lambda} = \partial_\lambda E
        - \partial^2_{\lambda w} L \; v, \qquad H v = \nabla_w E,
      \qquad H = \nabla^2_w L(w^*, \lambda),$$

    with Hessian-vector products only (never a dense Hessian unless `linear_solver` forms
    one, as `lx.LU()` does). Exact when `params_star` is an exact minimiser.

    **Arguments:**

    - `outer_loss`: `(params, hparams, outer_data) -> scalar`, the validation objective $E$.
    - `inner_loss`: `(params, hparams, inner_data) -> scalar`, the training objective $L$.
    - `params_star`: a solution of the inner problem, $\nabla_w L(w^*, \lambda) = 0$ (for
        instance `inner_solve(...).params`); its own derivative is ignored.
    - `hparams`: the hyperparameters $\lambda$, any pytree with at least one floating-point
        array (Python floats are made arrays).
    - `inner_data`, `outer_data`: any pytrees passed to the two losses.
    - `linear_solver`: any `lineax` solver, or [`bilevax.Neumann`][]; wrap it in
        [`bilevax.Preconditioned`][] to precondition it. The default is [`bilevax.CG`][] at
        relative tolerance $10^{-10}$ in float64 ($10^{-5}$ in float32): `tol` is only
        checked, and `params_star` may be more accurate than it.
    - `mode`: `"reverse"` (one linear solve for the adjoint $v$) or `"forward"` (one solve per
        scalar hyperparameter, batched; the same numbers).
    - `has_aux`: also return a [`bilevax.HypergradInfo`][]: the result, the inner gradient
        norm, the linear solve's residual and iterations, and the adjoint $v$ (for a warm
        start). The Lanczos and error-estimate diagnostics are
        [`bilevax.diagnostics.hypergrad_info`][], a function of the problem and this info.
    - `adjoint_init`: the linear solver's initial guess for $v$ (shaped like the
        floating-point part of `params_star`), typically `info.adjoint` from the previous
        outer step; for solvers with a `y0` option (CG).
    - `throw`: whether a failed linear solve raises (the default) or gives a NaN
        hypergradient (an approximate one for a solve cut short at its `max_steps`) with the
        reason in the info's `result`.
    - `tol`: the tolerance to which `params_star` is stationary,
        $\|\nabla_w L\|_2 \le$ `tol` (pass the `tol` of the [`bilevax.inner_solve`][] that
        found it), which the info checks (`not_stationary`). The default, `None`, checks
        $10^{-6}$ in float64 (the default of [`bilevax.inner_solve`][]) and $10^{-3}$ below,
        as [`bilevax.implicit_diff`][] does.
    - `adjoint`: `None` (the default) for the linear solve above, or an approximate adjoint
        that replaces $H^{-1}$ by the derivative of one step of `solver`
        ([`bilevax.OneStepAdjoint`][], [`bilevax.FiniteDifferenceAdjoint`][] (DARTS),
        [`bilevax.SAMAAdjoint`][]): no linear solve, and with `has_aux=True` an info whose
        `adjoint` is the approximate $v$ and `residual_norm` its residual
        $\|Hv - \nabla_w E\|_2$, so that [`bilevax.diagnostics.hypergrad_info`][] (given
        the hypergradient too) estimates the approximation's error. `linear_solver` and
        `adjoint_init` do not apply; the finite-difference adjoints are reverse-mode only.
    - `solver`: with `adjoint`, the inner solver whose step is differentiated (that of the
        [`bilevax.inner_solve`][] that found `params_star`), e.g.
        `bx.GradientDescent(learning_rate)` or `optax.adam(...)`; required with `adjoint`.
    - `solver_state`: with `adjoint`, the solver's state at `params_star` (the solve's
        `state`; [`bilevax.SAMAAdjoint`][] reads Adam's moments there); `None` for the
        solver's initial state.

    **Returns:**

    `(value, hypergrad)`, as `jax.value_and_grad` returns them, with `hypergrad` shaped like
    `hparams` (`None` at non-floating-point leaves); `(value, hypergrad, info)` with
    `has_aux=True`.
    """
    check_callable("outer_loss", outer_loss)
    check_callable("inner_loss", inner_loss)
    check_mode(mode)
    if linear_solver is not None:
        check_linear_solver(linear_solver)
    check_bool("has_aux", has_aux)
    check_bool("throw", throw)
    if tol is not None:
        check_nonnegative("tol", tol)
    hparams = check_hparams(hparams)
    float_params, static_params = split_params(params_star, "params_star")
    check_scalar_loss("inner_loss", inner_loss, params_star, hparams, inner_data, "params_star")
    check_scalar_loss("outer_loss", outer_loss, params_star, hparams, outer_data, "params_star")
    gradient = eqx.filter_eval_shape(eqx.filter_grad(inner_loss), params_star, hparams, inner_data)
    check_same_structure("params_star", gradient, float_params, "the gradient of `inner_loss`")
    if adjoint_init is not None:
        check_same_structure("adjoint_init", adjoint_init, float_params, "`params_star`")
    if adjoint is not None:
        return _approximate(
            adjoint,
            outer_loss,
            inner_loss,
            params_star,
            hparams,
            (inner_data, outer_data),
            linear_solver=linear_solver,
            mode=mode,
            has_aux=has_aux,
            adjoint_init=adjoint_init,
            tol=stationarity_tol(float_params, tol),
            solver=solver,
            solver_state=solver_state,
        )
    if solver is not None or solver_state is not None:
        raise ValueError(
            "`solver` and `solver_state` are those of an approximate `adjoint` (e.g. "
            "`adjoint=bx.OneStepAdjoint()`); the exact hypergradient needs neither."
        )
    if linear_solver is None:
        linear_solver = default_linear_solver(float_params)

    solve_adjoint = lambda: adjoint_hypergrad(
        outer_loss,
        inner_loss,
        params_star,
        hparams,
        (inner_data, outer_data),
        linear_solver,
        throw=throw,
        adjoint_init=adjoint_init,
        tol=stationarity_tol(float_params, tol),
    )
    if mode == "reverse":
        value, hypergrad, info = solve_adjoint()
        return (value, hypergrad, info) if has_aux else (value, hypergrad)
    converted = eqx.filter_closure_convert(inner_loss, params_star, hparams, inner_data)
    optimality = GradientOptimality(static_params)

    def objective(hparams):
        params = implicit_solution(
            float_params,
            optimality,
            (converted, hparams, inner_data),
            linear_solver,
            symmetric=True,
            throw=throw,
        )
        return outer_loss(eqx.combine(params, static_params), hparams, outer_data)

    value, hypergrad = forward_value_and_grad(objective, hparams)
    if not has_aux:
        return value, hypergrad
    # The info needs the adjoint, which forward mode never forms: one more solve.
    info = solve_adjoint()[2]
    return value, hypergrad, info


def _approximate(
    adjoint,
    outer_loss,
    inner_loss,
    params_star,
    hparams,
    data,
    *,
    linear_solver,
    mode,
    has_aux,
    adjoint_init,
    tol,
    solver,
    solver_state,
):
    """`implicit_hypergrad` with an approximate adjoint: its own checks, then
    `approximate_hypergrad`."""
    check_instance(
        "adjoint",
        adjoint,
        AbstractApproximateAdjoint,
        "None or an approximate adjoint (`bx.OneStepAdjoint()`, `bx.FiniteDifferenceAdjoint()`, "
        "`bx.SAMAAdjoint(...)`)",
    )
    if linear_solver is not None or adjoint_init is not None:
        raise ValueError(
            "`linear_solver` and `adjoint_init` are those of the exact adjoint's linear solve; "
            f"`adjoint={type(adjoint).__name__}(...)` solves nothing."
        )
    if solver is None:
        raise ValueError(
            f"`adjoint={type(adjoint).__name__}(...)` differentiates a step of the inner solver: "
            "pass it as `solver` (e.g. `solver=bx.GradientDescent(learning_rate)`)."
        )
    if mode == "forward" and not adjoint.forward_mode:
        raise ValueError(
            f'`mode="forward"` is not available with `{type(adjoint).__name__}`: its finite '
            "difference of the hyperparameter gradient is a reverse-mode construction. Use "
            '`mode="reverse"`, or `bx.OneStepAdjoint()` (the same estimate with exact products).'
        )
    value, hypergrad, info = approximate_hypergrad(
        adjoint,
        outer_loss,
        inner_loss,
        params_star,
        hparams,
        data,
        as_inner_solver(solver, hparams),
        solver_state,
        mode=mode,
        tol=tol,
        has_aux=has_aux,
    )
    return cast(Any, (value, hypergrad, info) if has_aux else (value, hypergrad))
