from typing import Literal

import equinox as eqx
import lineax as lx

from ._checks import (
    check_callable,
    check_linear_solver,
    check_mode,
    check_same_structure,
    check_scalar_loss,
    split_params,
)
from ._custom_types import Data, HParams, Params
from ._forward import forward_value_and_grad
from ._implicit_jvp import implicit_solution


def implicit_hypergrad(
    outer_loss,
    inner_loss,
    params_star: Params,
    hparams: HParams,
    inner_data: Data = None,
    outer_data: Data = None,
    *,
    linear_solver: lx.AbstractLinearSolver = lx.CG(rtol=1e-6, atol=1e-6),
    mode: Literal["reverse", "forward"] = "reverse",
):
    r"""Hypergradient of `outer_loss` at a solution of the inner problem, by the implicit
    function theorem (Bengio 2000; Pedregosa 2016; Lorraine et al. 2020):

    $$\frac{\mathrm{d}E}{\mathrm{d}\lambda} = \partial_\lambda E
        - \partial^2_{\lambda w} L \; H^{-1} \nabla_w E,
      \qquad H = \nabla^2_w L(w^*, \lambda),$$

    with Hessian-vector products only (never a dense Hessian unless `linear_solver` forms
    one, as `lx.LU()` does). Exact when `params_star` is an exact minimiser.

    **Arguments:**

    - `outer_loss`: `(params, hparams, outer_data) -> scalar`, the validation objective $E$.
    - `inner_loss`: `(params, hparams, inner_data) -> scalar`, the training objective $L$.
    - `params_star`: a solution of the inner problem, $\nabla_w L(w^*, \lambda) = 0$ (for
        instance `inner_solve(...).params`); its own derivative is ignored.
    - `hparams`: the hyperparameters $\lambda$, any pytree.
    - `inner_data`, `outer_data`: any pytrees passed to the two losses.
    - `linear_solver`: any `lineax` solver, or [`bilevax.Neumann`][]. `lx.CG` suits the
        positive definite Hessian of a strictly convex inner problem.
    - `mode`: `"reverse"` (one linear solve, with $H^{\top}$) or `"forward"` (one solve per
        scalar hyperparameter, batched with `vmap`; the same numbers).

    **Returns:**

    `(value, hypergrad)`, as `jax.value_and_grad` returns them, with `hypergrad` shaped like
    `hparams` (`None` at non-floating-point leaves).
    """
    check_callable("outer_loss", outer_loss)
    check_callable("inner_loss", inner_loss)
    check_mode(mode)
    check_linear_solver(linear_solver)
    float_params, static_params = split_params(params_star, "params_star")
    check_scalar_loss("inner_loss", inner_loss, params_star, hparams, inner_data, "params_star")
    check_scalar_loss("outer_loss", outer_loss, params_star, hparams, outer_data, "params_star")
    gradient = eqx.filter_eval_shape(eqx.filter_grad(inner_loss), params_star, hparams, inner_data)
    check_same_structure("params_star", gradient, float_params, "the gradient of `inner_loss`")
    inner_loss = eqx.filter_closure_convert(inner_loss, params_star, hparams, inner_data)

    def objective(hparams):
        params = implicit_solution(
            float_params,
            inner_loss,
            hparams,
            inner_data,
            linear_solver,
            static_params=static_params,
        )
        return outer_loss(eqx.combine(params, static_params), hparams, outer_data)

    if mode == "forward":
        return forward_value_and_grad(objective, hparams)
    return eqx.filter_value_and_grad(objective)(hparams)
