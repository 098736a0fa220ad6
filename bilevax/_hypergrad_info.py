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

from ._custom_types import Data, HParams, Params
from ._implicit_jvp import HESSIAN_TAGS
from ._misc import tree_isfinite, tree_norm
from ._preconditioner import build_preconditioner
from ._spectrum import ritz_values


class HypergradResult(eqx.Enumeration):
    """How the hypergradient computation of [`bilevax.implicit_hypergrad`][] ended."""

    successful = ""
    linear_solve_failed = (
        "The linear solve `H v = ∇_w E` did not reach its tolerance: raise its `max_steps`, "
        "add a `preconditioner`, or use a direct solver such as `lx.Cholesky()`."
    )
    not_positive_definite = (
        "The Hessian of the inner loss at `params_star` is not positive definite (a Ritz value "
        "is <= 0): `params_star` is not a strict local minimiser, and CG's answer cannot be "
        "trusted. Solve the inner problem further, or use `lx.GMRES`, "
        "`lx.Normal(lx.CG(...))` or `bx.Damped(lx.CG(...), damping)`."
    )
    nonfinite = "The hypergradient is not finite (NaN or inf)."


class HypergradInfo(eqx.Module):
    r"""What [`bilevax.implicit_hypergrad`][] reports with `has_aux=True`.

    **Attributes:**

    - `result`: a [`bilevax.HypergradResult`][].
    - `inner_grad_norm`: $\|\nabla_w L(w, \lambda)\|_2$ at `params_star`.
    - `residual_norm`: $\|H v - \nabla_w E\|_2$, the linear solve's residual.
    - `solve_steps`: the linear solver's iterations (0 for a direct solver).
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


def hypergrad_with_info(
    outer_loss,
    inner_loss,
    params_star: Params,
    hparams: HParams,
    inner_data: Data,
    outer_data: Data,
    *,
    linear_solver: lx.AbstractLinearSolver,
    adjoint_init: PyTree | None,
    preconditioner,
    lanczos_steps: int,
    estimate_error: bool,
    key: Array,
    diagnostic_solver: lx.AbstractLinearSolver | None = None,
):
    """`(value, hypergrad, HypergradInfo)` by an explicit adjoint solve (see the module)."""
    float_params, static_params = eqx.partition(params_star, eqx.is_inexact_array)
    float_hparams, static_hparams = eqx.partition(hparams, eqx.is_inexact_array)

    def L(w, lam):
        return inner_loss(
            eqx.combine(w, static_params), eqx.combine(lam, static_hparams), inner_data
        )

    def E(w, lam):
        return outer_loss(
            eqx.combine(w, static_params), eqx.combine(lam, static_hparams), outer_data
        )

    w, lam = float_params, float_hparams
    grad_L = jax.grad(L)
    grad = grad_L(w, lam)
    value, (outer_w, outer_lam) = jax.value_and_grad(E, argnums=(0, 1))(w, lam)
    hessian = lx.linearise(
        lx.JacobianLinearOperator(lambda w, _: grad_L(w, lam), w, tags=HESSIAN_TAGS)
    )
    precondition_key, lanczos_key, mixed_key = jax.random.split(key, 3)
    options = {}
    operator = build_preconditioner(preconditioner, hessian, precondition_key)
    if operator is not None:
        options["preconditioner"] = operator

    def solve(b, y0=None, solver=linear_solver):
        opts = options if y0 is None else {**options, "y0": y0}
        return lx.linear_solve(hessian, b, solver, options=opts, throw=False)

    def mixed_t(u):  # B^T u: the λ-gradient of ⟨∇_w L, u⟩
        return jax.vjp(lambda lam: grad_L(w, lam), lam)[1](u)[0]

    solution = solve(outer_w, adjoint_init)
    v = solution.value
    hypergrad = jax.tree.map(jnp.subtract, outer_lam, mixed_t(v))
    residual = jax.tree.map(jnp.subtract, hessian.mv(v), outer_w)
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
        # The estimate's own solves are accurate, relative to their right-hand sides, whatever
        # the tolerance of `linear_solver` (whose error they measure).
        if diagnostic_solver is None:
            rtol = 1e-8 if jnp.finfo(dtype).bits >= 64 else 1e-4
            diagnostic_solver = lx.CG(rtol=rtol, atol=0.0)
        precise = lambda b: solve(b, solver=diagnostic_solver).value
        newton = precise(grad)

        def F(w):  # ∂_λE(w) − B(w)^T v at fixed v
            return jax.tree.map(
                jnp.subtract,
                jax.grad(E, argnums=1)(w, lam),
                jax.vjp(lambda lam: grad_L(w, lam), lam)[1](v)[0],
            )

        def G(w):  # H(w) v − ∇_w E(w) at fixed v
            hv = jax.jvp(lambda w: grad_L(w, lam), (w,), (v,))[1]
            return jax.tree.map(jnp.subtract, hv, jax.grad(E)(w, lam))

        dF = jax.jvp(F, (w,), (newton,))[1]
        dG = jax.jvp(G, (w,), (newton,))[1]
        sensitivity = jax.tree.map(jnp.add, dF, mixed_t(precise(dG)))
        solve_error = mixed_t(precise(residual))
        error_estimate = tree_norm(jax.tree.map(jnp.subtract, sensitivity, solve_error))
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

    tolerance = 10 * jnp.finfo(dtype).eps * jnp.abs(hessian_max) * max(lanczos_steps, 1)
    result = HypergradResult.where(
        solution.result == lx.RESULTS.successful,
        HypergradResult.successful,
        HypergradResult.linear_solve_failed,
    )
    if lanczos_steps > 0:
        result = HypergradResult.where(
            hessian_min > tolerance, result, HypergradResult.not_positive_definite
        )
    finite = tree_isfinite(hypergrad) & jnp.isfinite(value)
    result = HypergradResult.where(finite, result, HypergradResult.nonfinite)
    info = HypergradInfo(
        result=result,
        inner_grad_norm=inner_grad_norm,
        residual_norm=residual_norm,
        solve_steps=jnp.asarray(solution.stats.get("num_steps", 0)),
        hessian_min=hessian_min,
        hessian_max=hessian_max,
        mixed_norm=mixed_norm,
        error_estimate=error_estimate,
        error_bound=error_bound,
        adjoint=v,
    )
    # `hypergrad` has `None` at the non-floating-point leaves, as `eqx.filter_grad` gives.
    return value, hypergrad, info
