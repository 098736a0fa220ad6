from typing import Literal

import equinox as eqx
import jax
import lineax as lx

from ._checks import (
    check_bool,
    check_callable,
    check_hparams,
    check_linear_solver,
    check_mode,
    check_nonnegative,
    check_same_structure,
    check_scalar_loss,
    split_params,
)
from ._custom_types import Data, HParams, InnerLoss, OuterLoss, Params
from ._forward import forward_value_and_grad
from ._ift import GradientOptimality, adjoint, hparams_vjp, implicit_solution
from ._linear_solver import default_linear_solver
from ._misc import tree_subtract
from .diagnostics._info import HypergradInfo, hypergrad_info


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
    tol=1e-6,
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
        relative tolerance $10^{-10}$ in float64 ($10^{-5}$ in float32).
    - `mode`: `"reverse"` (one linear solve for the adjoint $v$) or `"forward"` (one solve per
        scalar hyperparameter, batched; the same numbers).
    - `has_aux`: also return a [`bilevax.diagnostics.HypergradInfo`][]: the result, the inner
        gradient norm, the linear solve's residual and iterations, and the adjoint $v$ (for
        a warm start). The Lanczos and error-estimate diagnostics are
        [`bilevax.diagnostics.hypergrad_info`][], a function of the problem and this adjoint.
    - `adjoint_init`: the linear solver's initial guess for $v$ (shaped like the
        floating-point part of `params_star`), typically `info.adjoint` from the previous
        outer step; for solvers with a `y0` option (CG).
    - `throw`: whether a failed linear solve raises (the default) or gives a NaN
        hypergradient (an approximate one for a solve cut short at its `max_steps`) with the
        reason in the info's `result`.
    - `tol`: the stationarity test of the info: `params_star` is called stationary when
        $\|\nabla_w L\|_2 \le$ `tol`, the test [`bilevax.inner_solve`][] stops on.

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
    check_nonnegative("tol", tol)
    hparams = check_hparams(hparams)
    float_params, static_params = split_params(params_star, "params_star")
    check_scalar_loss("inner_loss", inner_loss, params_star, hparams, inner_data, "params_star")
    check_scalar_loss("outer_loss", outer_loss, params_star, hparams, outer_data, "params_star")
    gradient = eqx.filter_eval_shape(eqx.filter_grad(inner_loss), params_star, hparams, inner_data)
    check_same_structure("params_star", gradient, float_params, "the gradient of `inner_loss`")
    if adjoint_init is not None:
        check_same_structure("adjoint_init", adjoint_init, float_params, "`params_star`")
    if linear_solver is None:
        linear_solver = default_linear_solver(float_params)

    solve_adjoint = lambda: adjoint_hypergrad(
        outer_loss,
        inner_loss,
        params_star,
        hparams,
        inner_data,
        outer_data,
        linear_solver,
        throw=throw,
        adjoint_init=adjoint_init,
    )
    if mode == "reverse":
        value, hypergrad, v, result, stats = solve_adjoint()
    else:
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
        _, _, v, result, stats = solve_adjoint()
    if not has_aux:
        return value, hypergrad
    info = hypergrad_info(
        outer_loss,
        inner_loss,
        params_star,
        hparams,
        inner_data,
        outer_data,
        v,
        tol=tol,
        solve_result=result,
        solve_steps=stats.get("num_steps"),
        hypergrad=hypergrad,
        lanczos_steps=0,
        estimate_error=False,
    )
    return value, hypergrad, info


def adjoint_hypergrad(
    outer_loss: OuterLoss,
    inner_loss: InnerLoss,
    params_star: Params,
    hparams: HParams,
    inner_data: Data,
    outer_data: Data,
    linear_solver: lx.AbstractLinearSolver,
    *,
    throw: bool,
    adjoint_init: Params | None = None,
):
    r"""The reverse-mode hypergradient with its adjoint: `(value, hypergrad, v, result, stats)`
    with $v = H^{-1}\nabla_w E$ from one checked solve and
    $\text{hypergrad} = \partial_\lambda E - \partial^2_{\lambda w} L\, v$. The arguments are
    those of [`bilevax.implicit_hypergrad`][], already checked."""
    float_params, static_params = eqx.partition(params_star, eqx.is_inexact_array)
    # Arrays that `inner_loss` closes over become explicit inputs of the optimality condition.
    converted = eqx.filter_closure_convert(inner_loss, params_star, hparams, inner_data)
    optimality = GradientOptimality(static_params)
    inputs = (converted, hparams, inner_data)

    def outer(x):
        params, hparams = x
        return outer_loss(eqx.combine(params, static_params), hparams, outer_data)

    value, (outer_w, outer_lam) = eqx.filter_value_and_grad(outer)((float_params, hparams))
    v, result, stats = adjoint(
        optimality,
        float_params,
        inputs,
        outer_w,
        linear_solver,
        symmetric=True,
        throw=throw,
        adjoint_init=adjoint_init,
    )
    hypergrad = tree_subtract(outer_lam, hparams_vjp(optimality, float_params, inputs, v))
    return value, hypergrad, v, result, stats
