r"""How far an implicit hypergradient may be from the truth: Lanczos estimates of the Hessian's
extreme eigenvalues, and a first-order error estimate and bound, from the problem and the
[`bilevax.HypergradInfo`][] that [`bilevax.implicit_hypergrad`][] returns.

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
Grazzi et al. 2020). Both are first-order: exact up to $O(\|g\|^2 + \|r\|^2)$. The
solve's term is linear in $r$, so with an exact inner solution ($g = 0$) the estimate is the
error itself however large $r$ is: that of an approximate adjoint (one-step, DARTS, SAMA,
[`bilevax.OneStepAdjoint`][]), whose $v$ is no solve at all. With $g \neq 0$ the neglected
terms are $O(\|g\|^2 + \|g\|\,\|r\|)$.

A hypergradient that is not computed as $\partial_\lambda E - B^\top v$ (DARTS and SAMA take
$B^\top v$ by a finite difference) is given as `hypergrad`: its distance $\delta$ from that
statement, computed with one exact product $B^\top v$, is added to the error,
$h - h^* \approx D\hat h(w)[\Delta] - B^\top H^{-1} r + \delta$, and $\|\delta\|$ to the bound.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Scalar

from .._checks import check_bool, check_hparams, check_instance, check_int, check_same_structure
from .._custom_types import Data, HParams, Params
from .._hypergrad import hypergrad_from_adjoint
from .._ift import (
    GradientOptimality,
    default_linear_solver,
    hparams_vjp,
    linear_solve,
    linearized_optimality,
)
from .._misc import tree_norm, tree_subtract
from .._solution import RESULTS, HypergradInfo
from ._spectrum import ritz_values


# The names of the hypergradient's results before they joined `bilevax.RESULTS`.
HypergradResult = RESULTS


class HypergradDiagnostics(eqx.Module):
    r"""What [`bilevax.diagnostics.hypergrad_info`][] computes from a
    [`bilevax.HypergradInfo`][].

    **Attributes:**

    - `info`: the [`bilevax.HypergradInfo`][] it was computed from.
    - `result`: the info's result, or `not_positive_definite` where Lanczos found a Ritz
        value $\le 0$ (it outranks `not_stationary`; the solve's failures and `nonfinite`
        outrank it).
    - `hessian_min`, `hessian_max`: the extreme Ritz values of $H$ after `lanczos_steps`
        Lanczos steps; $\lambda_{\min} \le$ `hessian_min` and `hessian_max` $\le
        \lambda_{\max}$, with equality once `lanczos_steps` reaches the number of
        parameters. NaN with `lanczos_steps=0`.
    - `mixed_norm`: the estimated $\|\partial^2_{w\lambda} L\|_2$ (NaN with
        `lanczos_steps=0`).
    - `error_estimate`: the first-order estimate of $\|h - h^*\|_2$, from the inner
        gradient $g$ and the solve's residual $r$ (NaN unless `estimate_error=True`).
    - `error_bound`: $(\|D\hat h\|_2 \|g\| + \|B\|_2 \|r\|) / \mu$, a bound on the
        first-order error, with $\mu$ = `hessian_min` and the two norms from Lanczos on the
        hyperparameter side (NaN unless `estimate_error=True` and `lanczos_steps > 0`).
    """

    info: HypergradInfo
    result: RESULTS
    hessian_min: Scalar
    hessian_max: Scalar
    mixed_norm: Scalar
    error_estimate: Scalar
    error_bound: Scalar

    @property
    def positive_definite(self) -> Bool[Array, ""]:
        """Whether the Lanczos check found no non-positive curvature."""
        return self.result != RESULTS.not_positive_definite


def hypergrad_info(
    outer_loss,
    inner_loss,
    params_star: Params,
    hparams: HParams,
    inner_data: Data,
    outer_data: Data,
    info: HypergradInfo,
    *,
    lanczos_steps: int = 20,
    estimate_error: bool = True,
    linear_solver: lx.AbstractLinearSolver | None = None,
    key: Array | None = None,
    hypergrad: HParams | None = None,
) -> HypergradDiagnostics:
    r"""Diagnoses a hypergradient from the problem and its info (see the module): a pure
    function, built on the same Hessian operator, checked linear solve and statement of the
    hypergradient as [`bilevax.implicit_hypergrad`][].

    **Arguments:**

    - `outer_loss`, `inner_loss`, `params_star`, `hparams`, `inner_data`, `outer_data`: as
        for [`bilevax.implicit_hypergrad`][].
    - `info`: the [`bilevax.HypergradInfo`][] of `implicit_hypergrad(..., has_aux=True)` on
        the same problem (its adjoint $v$, inner gradient norm, residual norm and result).
    - `lanczos_steps`: Lanczos steps for the extreme eigenvalues of $H$ and
        $\|\partial^2_{w\lambda} L\|_2$, and the positive-definiteness check (0: none).
    - `estimate_error`: whether to compute the first-order error estimate (three more linear
        solves) and, with `lanczos_steps > 0`, the bound.
    - `linear_solver`: for the estimate's own solves, which must be accurate whatever the
        accuracy of $v$ (whose error they measure); default [`bilevax.CG`][] at the floor of
        the parameters' dtype ($10^{-10}$ in float64, $10^{-5}$ in float32).
    - `key`: a `jax.random.key` for the Lanczos starts (default `jax.random.key(0)`).
    - `hypergrad`: the hypergradient the info belongs to, shaped like `hparams`, when it is
        not $\partial_\lambda E - B^\top v$ exactly (an approximate adjoint's finite
        difference, [`bilevax.FiniteDifferenceAdjoint`][], [`bilevax.SAMAAdjoint`][]): its
        distance from that statement is part of the estimate and the bound. `None` (the
        default) takes it to be exact, as that of [`bilevax.implicit_hypergrad`][] is.

    **Returns:**

    A [`bilevax.diagnostics.HypergradDiagnostics`][].
    """
    check_instance(
        "info", info, HypergradInfo, "the info of `bx.implicit_hypergrad(..., has_aux=True)`"
    )
    check_int("lanczos_steps", lanczos_steps, 0)
    check_bool("estimate_error", estimate_error)
    # A Python float is a hyperparameter too: left as it is it would be static, with no
    # mixed derivative, and the error estimate would come out 0.
    hparams = check_hparams(hparams)
    float_params, static_params = eqx.partition(params_star, eqx.is_inexact_array)
    float_hparams, static_hparams = eqx.partition(hparams, eqx.is_inexact_array)
    v = info.adjoint
    check_same_structure(
        "info.adjoint", v, float_params, "the floating-point part of `params_star`"
    )
    optimality = GradientOptimality(static_params)
    inputs = lambda lam: (inner_loss, eqx.combine(lam, static_hparams), inner_data)

    def E(w, lam):
        return outer_loss(
            eqx.combine(w, static_params), eqx.combine(lam, static_hparams), outer_data
        )

    w, lam = float_params, float_hparams
    grad, hessian = linearized_optimality(optimality, w, inputs(lam), symmetric=True)
    dtype = jnp.result_type(*jax.tree.leaves(grad))
    nan = jnp.asarray(jnp.nan, dtype)
    lanczos_key, mixed_key = jax.random.split(jax.random.key(0) if key is None else key)

    def mixed_t(u):  # Bᵀu
        return hparams_vjp(optimality, w, inputs(lam), u)

    def mixed(u):  # B u: the λ-directional derivative of ∇_w L
        return jax.jvp(lambda lam: optimality(w, inputs(lam)), (lam,), (u,))[1]

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
            linear_solver = default_linear_solver(w)
        precise = lambda b: linear_solve(hessian, b, linear_solver, throw=False)[0]
        residual = tree_subtract(hessian.mv(v), jax.grad(E)(w, lam))
        newton = precise(grad)

        def F(w):  # the hypergradient at w for the fixed adjoint v
            outer_lam = jax.grad(E, argnums=1)(w, lam)
            return hypergrad_from_adjoint(optimality, w, inputs(lam), outer_lam, v)

        def G(w):  # H(w) v − ∇_w E(w) at fixed v
            hv = jax.jvp(lambda w: optimality(w, inputs(lam)), (w,), (v,))[1]
            return tree_subtract(hv, jax.grad(E)(w, lam))

        dF = jax.jvp(F, (w,), (newton,))[1]
        dG = jax.jvp(G, (w,), (newton,))[1]
        sensitivity = jax.tree.map(jnp.add, dF, mixed_t(precise(dG)))
        solve_error = mixed_t(precise(residual))
        error = tree_subtract(sensitivity, solve_error)
        statement_error = jnp.zeros((), dtype)
        if hypergrad is not None:
            float_hypergrad = eqx.filter(check_hparams(hypergrad), eqx.is_inexact_array)
            check_same_structure("hypergrad", float_hypergrad, lam, "`hparams`")
            delta = tree_subtract(float_hypergrad, F(w))
            error = jax.tree.map(jnp.add, error, delta)
            statement_error = tree_norm(delta)
        error_estimate = tree_norm(error)
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
            error_bound = (
                sensitivity_norm * info.inner_grad_norm + mixed_norm * info.residual_norm
            ) / hessian_min + statement_error

    result = info.result
    if lanczos_steps > 0:
        tolerance = 10 * jnp.finfo(dtype).eps * jnp.abs(hessian_max) * lanczos_steps
        # Above `not_stationary`, below the solve's failures and `nonfinite`.
        outranked = (result == RESULTS.successful) | (result == RESULTS.not_stationary)
        indefinite = outranked & ~(hessian_min > tolerance)
        result = RESULTS.where(indefinite, RESULTS.not_positive_definite, result)
    return HypergradDiagnostics(
        info=info,
        result=result,
        hessian_min=hessian_min,
        hessian_max=hessian_max,
        mixed_norm=mixed_norm,
        error_estimate=error_estimate,
        error_bound=error_bound,
    )
