"""The implicit function theorem as a `custom_jvp`: the one place where it is written down."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from ._custom_types import Data, HParams
from ._misc import stop_gradient


# The Hessian of the inner loss at a minimiser is symmetric positive semidefinite; the tags
# let `lx.CG` and `lx.Cholesky` accept it (other solvers ignore them).
HESSIAN_TAGS = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def implicit_solution(
    params_star: PyTree[Array],
    inner_loss,
    hparams: HParams,
    data: Data,
    linear_solver: lx.AbstractLinearSolver,
    *,
    static_params: PyTree = None,
) -> PyTree[Array]:
    r"""Returns `params_star` unchanged, differentiable with respect to `hparams`, `data` and
    the arrays `inner_loss` closes over, by the implicit function theorem.

    At a minimiser, $\nabla_w L(w^*(\lambda), \lambda) = 0$, so
    $\mathrm{d}w^* = -H^{-1}\,\partial_\lambda \nabla_w L \cdot \mathrm{d}\lambda$ with
    $H = \nabla^2_w L$. This is the JVP; JAX transposes it for reverse mode (through
    `lax.custom_linear_solve`, whose transpose is the same solve since $H$ is symmetric), and
    differentiates it again for Hessians. `H` is applied
    through Hessian-vector products only (forward-over-reverse), never formed, unless
    `linear_solver` is a dense one such as `lx.LU`.

    **Arguments:**

    - `params_star`: a pytree of floating-point arrays solving the inner problem; its own
        derivative is ignored.
    - `inner_loss`: `(params, hparams, data) -> scalar`, closure-converted so that arrays it
        closes over are explicit (see `eqx.filter_closure_convert`).
    - `linear_solver`: the `lineax` solver for $H x = b$.
    - `static_params`: the non-floating-point part of the parameters, combined with
        `params_star` before calling `inner_loss`.

    **Returns:**

    `params_star`, with the implicit derivative attached.
    """
    return _implicit(
        stop_gradient(params_star),
        (inner_loss, hparams, data),
        static_params=static_params,
        linear_solver=linear_solver,
    )


def _inner_grad(params, inputs, static_params):
    inner_loss, hparams, data = inputs
    loss = lambda p: inner_loss(eqx.combine(p, static_params), hparams, data)
    return jax.grad(loss)(params)


@eqx.filter_custom_jvp
def _implicit(params_star, inputs, *, static_params, linear_solver):
    del inputs, static_params, linear_solver
    return params_star


@_implicit.def_jvp
def _implicit_jvp(primals, tangents, *, static_params, linear_solver):
    params_star, inputs = primals
    _, inputs_tangent = tangents
    # Re-attach the implicit derivative to the primal point, so that differentiating this
    # rule again (`jax.hessian`) sees w* move with λ, as it does.
    params_star = _implicit(
        params_star, inputs, static_params=static_params, linear_solver=linear_solver
    )
    _, mixed = eqx.filter_jvp(
        lambda inputs: _inner_grad(params_star, inputs, static_params),
        (inputs,),
        (inputs_tangent,),
    )
    hessian = lx.JacobianLinearOperator(
        lambda params, inputs: _inner_grad(params, inputs, static_params),
        params_star,
        inputs,
        tags=HESSIAN_TAGS,
    )
    rhs = jax.tree.map(jnp.negative, mixed)
    hessian = lx.linearise(hessian)
    # `lax.custom_linear_solve` transposes to our own solve (H is symmetric). Transposing
    # `lx.linear_solve` directly would re-bind it with `throw=True`, so reverse mode would
    # raise on a solve that did not converge instead of returning what it has.
    solve = lambda _, b: lx.linear_solve(hessian, b, linear_solver, throw=False).value
    params_tangent = jax.lax.custom_linear_solve(hessian.mv, rhs, solve, symmetric=True)
    return params_star, params_tangent
