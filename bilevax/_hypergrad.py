r"""The implicit hypergradient in reverse mode through an explicit adjoint, with what it cost.

One checked linear solve gives the adjoint $v = H^{-1}\nabla_w E$ (`_ift.adjoint_solve`), and
the hypergradient is $\partial_\lambda E - (\partial_\lambda \nabla_w L)^\top v$
(`hypergrad_from_adjoint`). The info comes from what that computation has at hand: the inner
gradient (the primal of the linearisation that gives $H$) and one more product $H v$ for the
residual, which a caller that does not read it (under `jit`) does not pay.
[`bilevax.implicit_hypergrad`][] and HOAG call `adjoint_hypergrad`; the diagnostics call
`hypergrad_from_adjoint` to differentiate the same statement with respect to $w$.
"""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from ._custom_types import Data, HParams, OuterLoss, Params
from ._ift import GradientOptimality, adjoint_solve, hparams_vjp, linearized_optimality
from ._misc import tree_isfinite, tree_norm, tree_subtract
from ._solution import RESULTS, HypergradInfo


def hypergrad_from_adjoint(
    optimality: GradientOptimality,
    float_params: PyTree[Array],
    inputs: tuple,
    outer_hparams_grad: PyTree[Array],
    v: PyTree[Array],
) -> PyTree[Array]:
    r"""$\partial_\lambda E - (\partial_\lambda F)^\top v$, the hypergradient from the adjoint
    $v$, with $F$ = `optimality` at `float_params` and `inputs = (inner_loss, hparams, data)`."""
    return tree_subtract(outer_hparams_grad, hparams_vjp(optimality, float_params, inputs, v))


def adjoint_hypergrad(
    outer_loss: OuterLoss,
    inner_loss,
    params_star: Params,
    hparams: HParams,
    data: tuple[Data, Data],
    linear_solver: lx.AbstractLinearSolver,
    *,
    throw: bool,
    adjoint_init: PyTree[Array] | None = None,
    tol: Any = None,
) -> tuple[Array, PyTree[Array], HypergradInfo]:
    r"""`(value, hypergrad, info)`: the reverse-mode hypergradient from one checked solve of
    $H v = \nabla_w E$, and its [`bilevax.HypergradInfo`][]. The arguments are those of
    [`bilevax.implicit_hypergrad`][], already checked, with `data = (inner_data, outer_data)`;
    `tol`, if given, is the inner gradient norm up to which `params_star` counts as
    stationary."""
    inner_data, outer_data = data
    float_params, static_params = eqx.partition(params_star, eqx.is_inexact_array)
    # Arrays that `inner_loss` closes over become explicit inputs of the optimality condition.
    converted = eqx.filter_closure_convert(inner_loss, params_star, hparams, inner_data)
    optimality = GradientOptimality(static_params)
    inputs = (converted, hparams, inner_data)

    def outer(x):
        params, hparams = x
        return outer_loss(eqx.combine(params, static_params), hparams, outer_data)

    value, (outer_w, outer_lam) = eqx.filter_value_and_grad(outer)((float_params, hparams))
    inner_grad, hessian = linearized_optimality(optimality, float_params, inputs, symmetric=True)
    v, solve_result, stats = adjoint_solve(
        hessian, outer_w, linear_solver, throw=throw, adjoint_init=adjoint_init
    )
    hypergrad = hypergrad_from_adjoint(optimality, float_params, inputs, outer_lam, v)
    inner_grad_norm = tree_norm(inner_grad)
    residual_norm = tree_norm(tree_subtract(hessian.mv(v), outer_w))
    # Applied from the least to the most serious, so that the most serious one stands.
    result = RESULTS.successful
    if tol is not None:
        result = RESULTS.where(inner_grad_norm <= tol, result, RESULTS.not_stationary)
    # Not the residual: a caller that never reads it (HOAG) does not pay its product.
    finite = (
        tree_isfinite(hypergrad)
        & tree_isfinite(v)
        & jnp.isfinite(value)
        & jnp.isfinite(inner_grad_norm)
    )
    result = RESULTS.where(finite, result, RESULTS.nonfinite)
    # After the finiteness test: a failed solve's NaN (under `throw=False`) is its doing.
    solve_failure = RESULTS.where(
        solve_result == RESULTS.nonfinite_input, RESULTS.nonfinite, solve_result
    )
    result = RESULTS.where(solve_result == RESULTS.successful, result, solve_failure)
    info = HypergradInfo(
        result=result,
        inner_grad_norm=inner_grad_norm,
        residual_norm=residual_norm,
        solve_steps=jnp.asarray(stats.get("num_steps", 0)),
        adjoint=v,
    )
    return value, hypergrad, info
