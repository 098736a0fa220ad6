r"""The implicit function theorem: the one place where it is written down.

Notation, here and everywhere in bilevax: $w$ the inner variables (`params`), $\lambda$ the
outer ones (`hparams`), $L$ the inner loss, $E$ the outer loss. A solution of the inner problem
is a root of an optimality condition $F(w^*(\lambda), \lambda) = 0$: the gradient
$F = \nabla_w L$ for a smooth minimiser (then $J = \partial_w F = H = \nabla^2_w L$ is symmetric),
a solver's fixed-point residual for a constrained or non-smooth one, or a user's own
(`implicit_diff`). The theorem gives the derivative of $w^*$ in two forms:

- **tangent** (forward mode): $\mathrm{d}w^* = -J^{-1}\,\partial_\lambda F\,\mathrm{d}\lambda$;
- **adjoint** (reverse mode): with $v = J^{-\top} \nabla_w E$, the hypergradient is
  $\nabla_\lambda E(w^*(\lambda), \lambda) = \partial_\lambda E - (\partial_\lambda F)^\top v$.

Both use one Jacobian operator (`jacobian_operator`), applied through JVPs only, and one
checked linear solve (`linear_solve`) that carries the failure policy: a solve that failed
raises, or (with `throw=False`) returns NaN where its answer is meaningless.
"""

from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from ._linear_solver import CG
from ._misc import stop_gradient, tree_isfinite, tree_where_nan
from ._sharding import linear_operator, sharded_linear_solve


# The Hessian of the inner loss at a minimiser is symmetric positive semidefinite; the tags
# let `lx.CG`, `bx.CG` and `lx.Cholesky` accept it (other solvers ignore them).
HESSIAN_TAGS = (lx.symmetric_tag, lx.positive_semidefinite_tag)


class GradientOptimality(eqx.Module):
    r"""$F(w, \lambda) = \nabla_w L(w, \lambda, \text{data})$;
    `inputs = (inner_loss, hparams, data)`."""

    static_params: PyTree

    def __call__(self, params, inputs):
        inner_loss, hparams, data = inputs
        loss = lambda p: inner_loss(eqx.combine(p, self.static_params), hparams, data)
        return jax.grad(loss)(params)


class SolverOptimality(eqx.Module):
    """A solver's residual (a proximal solver's gradient mapping);
    `inputs = (inner_loss, hparams, data, solver)`."""

    static_params: PyTree

    def __call__(self, params, inputs):
        inner_loss, hparams, data, solver = inputs
        loss = lambda p, args: inner_loss(eqx.combine(p, self.static_params), *args)
        args = (hparams, data)
        return solver.residual(loss, params, jax.grad(loss)(params, args), args)


def optimality_for(solver, static_params, inner_loss, hparams, data):
    """The optimality condition of `solver` (`None`: the gradient) and its inputs, and whether
    its Jacobian is symmetric."""
    if solver is None or solver.residual_is_gradient:
        return GradientOptimality(static_params), (inner_loss, hparams, data), True
    return SolverOptimality(static_params), (inner_loss, hparams, data, solver), False


def jacobian_operator(optimality, params, inputs, *, symmetric: bool) -> lx.AbstractLinearOperator:
    r"""$J = \partial_w F(w, \text{inputs})$ as a `lineax` operator, linearised once: one
    `jax.linearize` of $F$, after which each product is a linear pass (for the gradient
    condition, a Hessian-vector product, forward-over-reverse). It is formed as a matrix only
    if a dense solver asks for one. Its input structure keeps the type of `params`, sharding
    included, so that it applies to sharded vectors (see `_sharding.py`)."""
    _, jvp = jax.linearize(lambda w: optimality(w, inputs), params)
    return linear_operator(jvp, params, tags=HESSIAN_TAGS if symmetric else ())


def general_solver(linear_solver: lx.AbstractLinearSolver) -> lx.AbstractLinearSolver:
    """The solver for a non-symmetric Jacobian: CG and Cholesky need a symmetric positive
    definite operator, so they run on the normal equations (jaxopt's `solve_normal_cg`)."""
    if isinstance(linear_solver, lx.CG | lx.Cholesky | CG):
        return lx.Normal(cast(Any, linear_solver))
    return linear_solver


_FAILURE_REASONS = {
    "max_steps_reached": "did not reach its tolerance within its `max_steps`",
    "singular": "found the system singular (or did not converge within 10x its size)",
    "breakdown": (
        "broke down: the operator is not positive definite where the solver needs it (CG on "
        "a Hessian that is not at a strict minimiser), or the series diverged (`Neumann` "
        "with a `scale` too large)"
    ),
    "stagnation": "stagnated",
    "conlim": "met an operator whose condition number exceeds `conlim`",
    "nonfinite_input": "met a non-finite (NaN or inf) value in its system or its answer",
}


def _message(name: str) -> str:
    if name == "successful":
        return ""
    if name == "nonfinite_input":
        return (
            "The linear solve of the implicit function theorem met a non-finite (NaN or inf) "
            "value: the data, the hyperparameters or the inner solution (a diverged inner "
            "solve returns NaN parameters) are not finite, so no derivative exists. Pass "
            "`throw=False` to get NaN instead of this error."
        )
    return (
        f"The linear solve of the implicit function theorem {_FAILURE_REASONS.get(name, name)}."
        " Raise the linear solver's `max_steps`, precondition it (`bx.Preconditioned`), damp "
        "it (`bx.Damped`), solve the inner problem further, or pass `throw=False` to get NaN "
        "(or, for a solve cut short, its approximate answer) instead of this error."
    )


# Indexed like `lx.RESULTS`, for `eqx.branched_error_if`.
_MESSAGES = tuple(
    _message(name)
    for name, _ in sorted(lx.RESULTS._name_to_item.items(), key=lambda kv: kv[1]._value)
)


def linear_solve(
    operator: lx.AbstractLinearOperator,
    vector: PyTree[Array],
    linear_solver: lx.AbstractLinearSolver,
    *,
    throw: bool,
    options: dict[str, Any] | None = None,
) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
    """`lx.linear_solve` under the failure policy.

    A non-finite right-hand side or answer is a failure (`lx.CG` returns its zero start on a
    NaN system and calls it a success). A failure raises with `throw=True`; with
    `throw=False` the answer is NaN, except for a solve cut short at its `max_steps`, whose
    approximate answer is kept (approximate is not failed) and flagged by the result.
    """
    value, result, stats = sharded_linear_solve(operator, vector, linear_solver, options)
    finite = tree_isfinite(vector) & tree_isfinite(value)
    result = lx.RESULTS.where(finite, result, lx.RESULTS.nonfinite_input)
    failed = result != lx.RESULTS.successful
    if throw:
        value = eqx.branched_error_if(value, failed, result._value, _MESSAGES)
    else:
        meaningless = failed & (result != lx.RESULTS.max_steps_reached)
        value = tree_where_nan(meaningless, value)
    return value, result, stats


def implicit_solution(
    params_star: PyTree[Array],
    optimality,
    inputs,
    linear_solver: lx.AbstractLinearSolver,
    *,
    symmetric: bool,
    throw: bool,
) -> PyTree[Array]:
    r"""Returns `params_star` unchanged, with the derivative of the theorem attached: a
    `jax.custom_jvp` whose rule is the tangent form, so forward mode (`jax.jvp`,
    `jax.jacfwd`), reverse mode (JAX transposes the solve through `lax.custom_linear_solve`
    into the adjoint form) and their compositions (`jax.hessian`) all work.

    **Arguments:**

    - `params_star`: a pytree of floating-point arrays solving $F = 0$; its own derivative
        is ignored.
    - `optimality`: `(params, inputs) -> residual`, an Equinox module (it is static).
    - `inputs`: what $F$ depends on, differentiated: hyperparameters, data, and the arrays a
        closure-converted loss closes over.
    - `linear_solver`: the `lineax` solver for $J x = b$ (and $J^\top x = b$).
    - `symmetric`: whether $J$ is symmetric positive semidefinite (the Hessian of a loss);
        otherwise `linear_solver` should accept a general operator (see `general_solver`).
    - `throw`: the failure policy of `linear_solve`.
    """
    return _implicit(
        stop_gradient(params_star),
        inputs,
        optimality=optimality,
        linear_solver=linear_solver,
        symmetric=symmetric,
        throw=throw,
    )


@eqx.filter_custom_jvp
def _implicit(params_star, inputs, *, optimality, linear_solver, symmetric, throw):
    del inputs, optimality, linear_solver, symmetric, throw
    return params_star


@_implicit.def_jvp
def _implicit_jvp(primals, tangents, *, optimality, linear_solver, symmetric, throw):
    params_star, inputs = primals
    _, inputs_tangent = tangents
    # Re-attach the implicit derivative to the primal point, so that differentiating this
    # rule again (`jax.hessian`) sees w* move with λ, as it does.
    params_star = _implicit(
        params_star,
        inputs,
        optimality=optimality,
        linear_solver=linear_solver,
        symmetric=symmetric,
        throw=throw,
    )
    _, mixed = eqx.filter_jvp(
        lambda inputs: optimality(params_star, inputs), (inputs,), (inputs_tangent,)
    )
    if all(m is None for m in jax.tree.leaves(mixed, is_leaf=_is_none)):
        # The condition does not depend on the differentiated inputs (the hyperparameters
        # enter only the outer loss): w* does not move.
        return params_star, jax.tree.map(jnp.zeros_like, params_star)
    jacobian = jacobian_operator(optimality, params_star, inputs, symmetric=symmetric)
    rhs = jax.tree.map(jnp.negative, _instantiate_linear_zeros(mixed, params_star))
    # `lax.custom_linear_solve` transposes to our own checked solve (with J itself when
    # symmetric), so reverse mode is the adjoint form under the same failure policy.
    solve = lambda _, b: linear_solve(jacobian, b, linear_solver, throw=throw)[0]
    if symmetric:
        params_tangent = jax.lax.custom_linear_solve(jacobian.mv, rhs, solve, symmetric=True)
    else:
        transposed = jacobian.transpose()
        transpose_solve = lambda _, b: linear_solve(transposed, b, linear_solver, throw=throw)[0]
        params_tangent = jax.lax.custom_linear_solve(jacobian.mv, rhs, solve, transpose_solve)
    return params_star, params_tangent


def adjoint(
    optimality,
    params: PyTree[Array],
    inputs,
    outer_grad: PyTree[Array],
    linear_solver: lx.AbstractLinearSolver,
    *,
    symmetric: bool,
    throw: bool,
    adjoint_init: PyTree[Array] | None = None,
) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
    r"""The adjoint $v = J^{-\top} \nabla_w E$ by one checked linear solve: what reverse mode
    through `implicit_solution` computes, returned so that it can be inspected, reused as
    a warm start (HOAG), or fed to the diagnostics; `adjoint_init` is the linear solver's
    initial guess (its `y0` option). Returns `(v, result, stats)`."""
    jacobian = jacobian_operator(optimality, params, inputs, symmetric=symmetric)
    operator = jacobian if symmetric else jacobian.transpose()
    options = None if adjoint_init is None else {"y0": adjoint_init}
    return linear_solve(operator, outer_grad, linear_solver, throw=throw, options=options)


def hparams_vjp(optimality, params: PyTree[Array], inputs: tuple, v: PyTree[Array]):
    r"""$(\partial_\lambda F)^\top v$, with $\lambda$ = `inputs[1]` (the hyperparameters);
    `None` at their non-floating-point leaves."""

    def residual(hparams):
        return optimality(params, (*inputs[:1], hparams, *inputs[2:]))

    _, pullback = eqx.filter_vjp(residual, inputs[1])
    return pullback(v)[0]


def _is_none(x) -> bool:
    return x is None


def _instantiate_linear_zeros(mixed, params: PyTree[Array]) -> PyTree[Array]:
    """`mixed` with its `None` leaves (a leaf whose condition does not depend on the
    differentiated inputs: an unpenalised bias) made zeros shaped like `params`. Such a
    leaf's right-hand side is zero, but its tangent is not: it moves through the coupling in
    J. The zeros are written as 0 times a sum of the other leaves, so that they are linear in
    the tangent, as `lax.custom_linear_solve` needs to transpose (a constant zero fails its
    transpose rule); a non-finite mixed term still poisons them, as it should."""
    leaves = jax.tree.leaves(mixed)

    def leaf(m, w):
        if m is not None:
            return m
        linear_zero = 0 * sum(jnp.sum(x).astype(w.dtype) for x in leaves)
        return jnp.broadcast_to(linear_zero, w.shape)

    return jax.tree.map(leaf, mixed, params, is_leaf=_is_none)
