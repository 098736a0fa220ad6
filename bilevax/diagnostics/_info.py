r"""The implicit hypergradient through an explicit adjoint solve, with what it cost and how far
it may be from the truth.

With $w$ an approximate inner solution, $g = \nabla_w L(w, \lambda)$, $H = \nabla^2_w L$,
$B = \partial^2_{w \lambda} L$ and $v$ an approximate solution of $H v = \nabla_w E$ with
residual $r = H v - \nabla_w E$, the hypergradient returned is
$h = \partial_\lambda E - B^\top v$. Its error against $h^* = \nabla f(\lambda)$ (at the exact
$w^*$ and $v^*$) is, to first order in $g$ and $r$,

$$h - h^* \approx D\hat h(w)[\Delta] - B^\top H^{-1} r, \qquad \Delta = H^{-1} g
  \approx w - w^*,$$

where $\hat h(w) = \partial_\lambda E(w) - B(w)^\top H(w)^{-1} \nabla_w E(w)$ is the
hypergradient at $w$ with an exact linear solve. Its norm is the *error estimate*. The
*error bound* replaces each term by its worst case over the inner error
$\|w - w^*\| \le \|g\|/\mu$ ($\mu$-strong convexity) and over $\|H^{-1} r\| \le \|r\|/\mu$:

$$\|h - h^*\| \lesssim \frac{\|D\hat h(w)\|_2 \, \|g\| + \|B\|_2 \, \|r\|}{\mu},$$

with $\mu$, $\|B\|_2$ and $\|D\hat h\|_2$ estimated by Lanczos (Pedregosa 2016;
Grazzi et al. 2020). Both are first-order: exact up to $O(\|g\|^2 + \|r\|^2)$.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from .._checks import (
    check_bool,
    check_hparams,
    check_int,
    check_nonnegative,
    check_same_structure,
)
from .._custom_types import Data, HParams, Params
from .._ift import GradientOptimality, jacobian_operator, linear_solve
from .._linear_solver import CG
from .._misc import tree_isfinite, tree_norm, tree_subtract
from ._spectrum import ritz_values


class HypergradResult(eqx.Enumeration):
    """How the hypergradient computation of [`bilevax.implicit_hypergrad`][] ended."""

    successful = ""
    linear_solve_failed = (
        "The linear solve `H v = ∇_w E` did not reach its tolerance: raise its `max_steps`, "
        "precondition it (`bx.Preconditioned`), or use a direct solver such as `lx.Cholesky()`."
    )
    linear_solve_breakdown = (
        "The linear solve `H v = ∇_w E` broke down: CG met a direction of non-positive "
        "curvature (the Hessian is not positive definite at `params_star`), or a Neumann "
        "series diverged (its `scale` is above 2 / the largest eigenvalue)."
    )
    not_stationary = (
        "`params_star` is not stationary: the inner gradient norm is above `tol`, so the "
        "hypergradient is that of another point. Solve the inner problem further."
    )
    not_positive_definite = (
        "The Hessian of the inner loss at `params_star` is not positive definite (a Ritz value "
        "is <= 0): `params_star` is not a strict local minimiser, and CG's answer cannot be "
        "trusted. Solve the inner problem further, or use `lx.GMRES`, "
        "`lx.Normal(lx.CG(...))` or `bx.Damped(lx.CG(...), damping)`."
    )
    nonfinite = "The hypergradient is not finite (NaN or inf)."


class HypergradInfo(eqx.Module):
    r"""What [`bilevax.implicit_hypergrad`][] reports with `has_aux=True`, and
    [`bilevax.diagnostics.hypergrad_info`][] computes.

    **Attributes:**

    - `result`: a [`bilevax.diagnostics.HypergradResult`][].
    - `inner_grad_norm`: $\|\nabla_w L(w, \lambda)\|_2$ at `params_star`.
    - `residual_norm`: $\|H v - \nabla_w E\|_2$, the linear solve's residual.
    - `solve_steps`: the linear solver's iterations (0 for a direct solver, and when the
        adjoint was given rather than solved for).
    - `hessian_min`, `hessian_max`: the extreme Ritz values of $H$ after `lanczos_steps`
        Lanczos steps; $\lambda_{\min} \le$ `hessian_min` and `hessian_max` $\le
        \lambda_{\max}$, with equality once `lanczos_steps` reaches the number of
        parameters. NaN with `lanczos_steps=0`.
    - `mixed_norm`: the estimated $\|\partial^2_{w\lambda} L\|_2$ (NaN with
        `lanczos_steps=0`).
    - `error_estimate`: the first-order estimate of $\|h - h^*\|_2$, from the inner
        gradient $g$ and the solve's residual $r$ (NaN unless `estimate_error=True`).
    - `error_bound`: $(\|D\hat h\|_2 \|g\| + \|B\|_2 \|r\|) / \mu$, a bound on the
        first-order error, with $\mu$ = `hessian_min` (which is $\ge \lambda_{\min}(H)$, with
        equality once `lanczos_steps` reaches the number of parameters) and the two norms from
        Lanczos on the hyperparameter side (NaN unless `estimate_error=True` and
        `lanczos_steps > 0`).
    - `adjoint`: the solution $v$ of $H v = \nabla_w E$, to pass back as `adjoint_init` at the
        next outer step (a warm start).

    The result is, in order of precedence: `nonfinite`, the linear solve's failure
    (`linear_solve_failed`, `linear_solve_breakdown`), `not_positive_definite` (Lanczos),
    `not_stationary`, `successful`.
    """

    result: HypergradResult
    inner_grad_norm: Scalar
    residual_norm: Scalar
    solve_steps: Int[Array, ""]
    hessian_min: Scalar
    hessian_max: Scalar
    mixed_norm: Scalar
    error_estimate: Scalar
    error_bound: Scalar
    adjoint: PyTree[Array]

    @property
    def positive_definite(self) -> Bool[Array, ""]:
        """Whether the Lanczos check found no non-positive curvature."""
        return self.result != HypergradResult.not_positive_definite


def hypergrad_info(
    outer_loss,
    inner_loss,
    params_star: Params,
    hparams: HParams,
    inner_data: Data,
    outer_data: Data,
    adjoint: PyTree[Array],
    *,
    tol=1e-6,
    lanczos_steps: int = 20,
    estimate_error: bool = True,
    linear_solver: lx.AbstractLinearSolver | None = None,
    key: Array | None = None,
    solve_result: lx.RESULTS | None = None,
    solve_steps: Array | None = None,
    hypergrad: PyTree[Array] | None = None,
) -> HypergradInfo:
    r"""Diagnoses a hypergradient from the problem and its adjoint $v$ (see the module): a
    pure function, built on the same Hessian operator and checked linear solve as
    [`bilevax.implicit_hypergrad`][].

    **Arguments:**

    - `outer_loss`, `inner_loss`, `params_star`, `hparams`, `inner_data`, `outer_data`: as
        for [`bilevax.implicit_hypergrad`][].
    - `adjoint`: $v$, e.g. `info.adjoint` from `implicit_hypergrad(..., has_aux=True)`.
    - `tol`: `params_star` is called stationary when $\|\nabla_w L\|_2 \le$ `tol`.
    - `lanczos_steps`: Lanczos steps for the extreme eigenvalues of $H$ and
        $\|\partial^2_{w\lambda} L\|_2$, and the positive-definiteness check (0: none).
    - `estimate_error`: whether to compute the first-order error estimate (three more linear
        solves) and, with `lanczos_steps > 0`, the bound.
    - `linear_solver`: for the estimate's own solves, which must be accurate whatever the
        accuracy of $v$ (whose error they measure); default [`bilevax.CG`][] at relative
        tolerance $10^{-8}$ in float64 ($10^{-4}$ in float32).
    - `key`: a `jax.random.key` for the Lanczos starts (default `jax.random.key(0)`).
    - `solve_result`, `solve_steps`: how the solve that produced $v$ ended, if known.
    - `hypergrad`: the hypergradient computed from $v$, if known (checked for finiteness).

    **Returns:**

    A [`bilevax.diagnostics.HypergradInfo`][].
    """
    check_int("lanczos_steps", lanczos_steps, 0)
    check_bool("estimate_error", estimate_error)
    check_nonnegative("tol", tol)
    # A Python float is a hyperparameter too: left as it is it would be static, with no
    # mixed derivative, and the error estimate would come out 0.
    hparams = check_hparams(hparams)
    float_params, static_params = eqx.partition(params_star, eqx.is_inexact_array)
    float_hparams, static_hparams = eqx.partition(hparams, eqx.is_inexact_array)
    check_same_structure(
        "adjoint", adjoint, float_params, "the floating-point part of `params_star`"
    )
    optimality = GradientOptimality(static_params)

    def grad_L(w, lam):
        return optimality(w, (inner_loss, eqx.combine(lam, static_hparams), inner_data))

    def E(w, lam):
        return outer_loss(
            eqx.combine(w, static_params), eqx.combine(lam, static_hparams), outer_data
        )

    w, lam, v = float_params, float_hparams, adjoint
    grad = grad_L(w, lam)
    value, (outer_w, outer_lam) = jax.value_and_grad(E, argnums=(0, 1))(w, lam)
    hessian = jacobian_operator(optimality, w, (inner_loss, hparams, inner_data), symmetric=True)
    lanczos_key, mixed_key = jax.random.split(jax.random.key(0) if key is None else key)

    def mixed_t(u):  # B^T u: the λ-gradient of ⟨∇_w L, u⟩
        return jax.vjp(lambda lam: grad_L(w, lam), lam)[1](u)[0]

    if hypergrad is None:
        hypergrad = tree_subtract(outer_lam, mixed_t(v))
    residual = tree_subtract(hessian.mv(v), outer_w)
    inner_grad_norm, residual_norm = tree_norm(grad), tree_norm(residual)
    dtype = jnp.result_type(*jax.tree.leaves(grad))
    nan = jnp.asarray(jnp.nan, dtype)

    def mixed(u):  # B u: the λ-directional derivative of ∇_w L
        return jax.jvp(lambda lam: grad_L(w, lam), (lam,), (u,))[1]

    flat_lam, unravel_lam = ravel_pytree(lam)
    hessian_min = hessian_max = mixed_norm = nan
    if lanczos_steps > 0:
        flat_w, unravel_w = ravel_pytree(w)
        hvp = lambda x: ravel_pytree(hessian.mv(unravel_w(x)))[0]
        ritz = ritz_values(hvp, flat_w.size, lanczos_steps, flat_w.dtype, lanczos_key)
        hessian_min, hessian_max = ritz[0], ritz[-1]
        if flat_lam.size > 0:
            gram = lambda x: ravel_pytree(mixed_t(mixed(unravel_lam(x))))[0]
            top = ritz_values(gram, flat_lam.size, lanczos_steps, flat_lam.dtype, mixed_key)[-1]
            mixed_norm = jnp.sqrt(jnp.maximum(top, 0))

    error_estimate = error_bound = nan
    if estimate_error:
        if linear_solver is None:
            rtol = 1e-8 if jnp.finfo(dtype).bits >= 64 else 1e-4
            linear_solver = CG(rtol=rtol, atol=0.0)
        precise = lambda b: linear_solve(hessian, b, linear_solver, throw=False)[0]
        newton = precise(grad)

        def F(w):  # ∂_λE(w) − B(w)^T v at fixed v
            return tree_subtract(
                jax.grad(E, argnums=1)(w, lam),
                jax.vjp(lambda lam: grad_L(w, lam), lam)[1](v)[0],
            )

        def G(w):  # H(w) v − ∇_w E(w) at fixed v
            hv = jax.jvp(lambda w: grad_L(w, lam), (w,), (v,))[1]
            return tree_subtract(hv, jax.grad(E)(w, lam))

        dF = jax.jvp(F, (w,), (newton,))[1]
        dG = jax.jvp(G, (w,), (newton,))[1]
        sensitivity = jax.tree.map(jnp.add, dF, mixed_t(precise(dG)))
        solve_error = mixed_t(precise(residual))
        error_estimate = tree_norm(tree_subtract(sensitivity, solve_error))
        if lanczos_steps > 0 and flat_lam.size > 0:
            # ‖Dĥ‖₂ from the small λ-side Gram operator Dĥ Dĥᵀ, with
            # Dĥ[u] = ∂_w F[u] + Bᵀ H⁻¹ ∂_w G[u] and Dĥᵀ[y] = ∂_w Fᵀ y + ∂_w Gᵀ H⁻¹ B y.
            F_t, G_t = jax.vjp(F, w)[1], jax.vjp(G, w)[1]

            def gram(x):
                y = unravel_lam(x)
                u = jax.tree.map(jnp.add, F_t(y)[0], G_t(precise(mixed(y)))[0])
                du = jax.tree.map(
                    jnp.add,
                    jax.jvp(F, (w,), (u,))[1],
                    mixed_t(precise(jax.jvp(G, (w,), (u,))[1])),
                )
                return ravel_pytree(du)[0]

            top = ritz_values(gram, flat_lam.size, lanczos_steps, flat_lam.dtype, mixed_key)[-1]
            sensitivity_norm = jnp.sqrt(jnp.maximum(top, 0))
            error_bound = (sensitivity_norm * inner_grad_norm + mixed_norm * residual_norm) / (
                hessian_min
            )

    # Applied from the least to the most serious, so that the most serious one stands.
    result = HypergradResult.where(
        inner_grad_norm <= tol, HypergradResult.successful, HypergradResult.not_stationary
    )
    if lanczos_steps > 0:
        tolerance = 10 * jnp.finfo(dtype).eps * jnp.abs(hessian_max) * lanczos_steps
        result = HypergradResult.where(
            hessian_min > tolerance, result, HypergradResult.not_positive_definite
        )
    finite = (
        tree_isfinite(hypergrad)
        & tree_isfinite(v)
        & jnp.isfinite(value)
        & jnp.isfinite(inner_grad_norm)
        & jnp.isfinite(residual_norm)
    )
    result = HypergradResult.where(finite, result, HypergradResult.nonfinite)
    if solve_result is not None:
        # After the finiteness test: a failed solve's NaN (under `throw=False`) is its doing.
        result = HypergradResult.where(
            solve_result == lx.RESULTS.successful, result, _from_solve(solve_result)
        )
    return HypergradInfo(
        result=result,
        inner_grad_norm=inner_grad_norm,
        residual_norm=residual_norm,
        solve_steps=jnp.asarray(0 if solve_steps is None else solve_steps),
        hessian_min=hessian_min,
        hessian_max=hessian_max,
        mixed_norm=mixed_norm,
        error_estimate=error_estimate,
        error_bound=error_bound,
        adjoint=v,
    )


def _from_solve(solve_result: lx.RESULTS) -> HypergradResult:
    """The info's result for a linear solve that did not succeed."""
    result = HypergradResult.linear_solve_failed
    for lineax_result, ours in (
        (lx.RESULTS.breakdown, HypergradResult.linear_solve_breakdown),
        (lx.RESULTS.nonfinite_input, HypergradResult.nonfinite),
    ):
        result = HypergradResult.where(solve_result == lineax_result, ours, result)
    return result
