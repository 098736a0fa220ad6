from typing import Literal

import equinox as eqx
import jax
import lineax as lx

from ._checks import (
    check_callable,
    check_int,
    check_linear_solver,
    check_mode,
    check_same_structure,
    check_scalar_loss,
    split_params,
)
from ._custom_types import Data, HParams, Params
from ._forward import forward_value_and_grad
from ._hypergrad_info import hypergrad_with_info
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
    has_aux: bool = False,
    adjoint_init=None,
    preconditioner=None,
    lanczos_steps: int = 20,
    estimate_error: bool = True,
    key=None,
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
    - `has_aux`: also return a [`bilevax.HypergradInfo`][]: the inner gradient norm, the
        linear solve's residual and iterations, Lanczos estimates of the Hessian's extreme
        eigenvalues (and a positive-definiteness check), an estimate and a bound of the
        hypergradient's error, and the adjoint $v = H^{-1}\nabla_w E$ for a warm start.
    - `adjoint_init`: an initial guess for $v$ (shaped like the floating-point part of
        `params_star`), typically `info.adjoint` from the previous outer step.
    - `preconditioner`: a [`bilevax.JacobiPreconditioner`][], or a positive definite `lineax`
        operator $P \approx H^{-1}$, for `lx.CG` (and other solvers accepting it).
    - `lanczos_steps`: Lanczos steps for the eigenvalue estimates in the info (0: none).
    - `estimate_error`: whether the info has the error estimate and bound (three more
        linear solves, and two per Lanczos step on the hyperparameter side for the bound).
    - `key`: a `jax.random.key` for the Lanczos start and the Hutchinson samples (default:
        `jax.random.key(0)`).

    With any of `has_aux`, `adjoint_init` or `preconditioner`, the hypergradient is computed
    by an explicit adjoint solve ($v = H^{-1}\nabla_w E$, then one vector-Jacobian product),
    reverse mode only; it is then not meant to be differentiated again (use the default path
    for `jax.hessian`). The info's extras are computed only with `has_aux=True`.

    **Returns:**

    `(value, hypergrad)`, as `jax.value_and_grad` returns them, with `hypergrad` shaped like
    `hparams` (`None` at non-floating-point leaves); `(value, hypergrad, info)` with
    `has_aux=True`.
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
    if has_aux or adjoint_init is not None or preconditioner is not None:
        if mode != "reverse":
            raise ValueError(
                '`has_aux`, `adjoint_init` and `preconditioner` need `mode="reverse"`.'
            )
        check_int("lanczos_steps", lanczos_steps, 0)
        if adjoint_init is not None:
            check_same_structure("adjoint_init", adjoint_init, float_params, "`params_star`")
        value, hgrad, info = hypergrad_with_info(
            outer_loss,
            inner_loss,
            params_star,
            hparams,
            inner_data,
            outer_data,
            linear_solver=linear_solver,
            adjoint_init=adjoint_init,
            preconditioner=preconditioner,
            lanczos_steps=lanczos_steps if has_aux else 0,
            estimate_error=estimate_error and has_aux,
            key=jax.random.key(0) if key is None else key,
        )
        return (value, hgrad, info) if has_aux else (value, hgrad)
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
