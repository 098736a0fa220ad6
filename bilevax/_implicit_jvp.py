r"""The implicit function theorem as a `custom_jvp`: the one place where it is written down.

Everything is stated for a root-form optimality condition $F(w^*(\theta), \theta) = 0$; the
gradient condition $\nabla_w L = 0$ of a smooth minimiser is the special case with a symmetric
positive semidefinite Jacobian $\partial_w F = \nabla^2_w L$.
"""

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from ._checks import check_callable, check_linear_solver, check_same_structure
from ._custom_types import Data, HParams
from ._misc import stop_gradient
from ._solvers import AbstractInnerSolver


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
    solver: Any = None,
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

    With a `solver` whose optimality condition is not the gradient (a
    [`bilevax.ProximalGradient`][] or [`bilevax.ProjectedGradient`][]), the condition is the
    solver's fixed-point residual $F(w, \lambda) = 0$ instead, and the solve uses
    $\partial_w F$, which is not symmetric (see [`bilevax.implicit_diff`][]).

    **Arguments:**

    - `params_star`: a pytree of floating-point arrays solving the inner problem; its own
        derivative is ignored.
    - `inner_loss`: `(params, hparams, data) -> scalar`, closure-converted so that arrays it
        closes over are explicit (see `eqx.filter_closure_convert`).
    - `linear_solver`: the `lineax` solver for $H x = b$.
    - `static_params`: the non-floating-point part of the parameters, combined with
        `params_star` before calling `inner_loss`.
    - `solver`: the [`bilevax.AbstractInnerSolver`][] that produced `params_star`, if its
        optimality condition is not $\nabla_w L = 0$; `None` (the default) for the gradient.

    **Returns:**

    `params_star`, with the implicit derivative attached.
    """
    if solver is not None and not isinstance(solver, AbstractInnerSolver):
        raise TypeError(
            "`solver` must be None or a `bilevax.AbstractInnerSolver`, got "
            f"{type(solver).__name__}."
        )
    if solver is None or solver.residual_is_gradient:
        return _implicit(
            stop_gradient(params_star),
            (inner_loss, hparams, data),
            optimality=_GradientOptimality(static_params),
            linear_solver=linear_solver,
            symmetric=True,
        )
    return _implicit(
        stop_gradient(params_star),
        (inner_loss, hparams, data, stop_gradient(solver)),
        optimality=_SolverOptimality(static_params),
        linear_solver=_general_solver(linear_solver),
        symmetric=False,
    )


def implicit_diff(
    solve_fn: Callable,
    optimality_fn: Callable | None = None,
    *,
    fixed_point_fn: Callable | None = None,
    linear_solver: lx.AbstractLinearSolver = lx.CG(rtol=1e-6, atol=1e-6),
    symmetric: bool = False,
    has_aux: bool = False,
) -> Callable:
    r"""Attaches implicit differentiation to any solver: the bilevax form of jaxopt's
    `custom_root` and `custom_fixed_point`.

    `solve_fn(init, *args)` is any routine returning $w^*$ with $F(w^*, \text{args}) = 0$: a
    closed form, an `optimistix` or `lineax` call, a hand-written CG or coordinate-descent
    loop. It is run without being differentiated; the returned function gives its output the
    derivative of the implicit function theorem,
    $$\mathrm{d}w^* = -(\partial_w F)^{-1}\,\partial_{\theta} F \cdot \mathrm{d}\theta,
      \qquad \theta = \text{args},$$
    as a `jax.custom_jvp`, so forward mode (`jax.jvp`, `jax.jacfwd`), reverse mode
    (`jax.grad`; one transposed solve through `lax.custom_linear_solve`) and their
    compositions (`jax.hessian`) all work, as do `jax.jit` and `jax.vmap`. $\partial_w F$ is
    applied through JVPs only, unless `linear_solver` forms it (`lx.LU()`).

    **Arguments:**

    - `solve_fn`: `(init, *args) -> solution`, where `solution` is a pytree of floating-point
        arrays. The derivative with respect to `init` is zero, as at an exact solution.
    - `optimality_fn`: `(solution, *args) -> residual`, with the structure of `solution`, zero
        at a solution. For a minimiser of `loss` this is `jax.grad(loss)` (and pass
        `symmetric=True`). Arrays it closes over are differentiated too.
    - `fixed_point_fn`: instead of `optimality_fn`, a map `T(solution, *args)` whose fixed
        point is the solution (the residual is then $w - T(w)$), as in jaxopt's
        `custom_fixed_point`. Give exactly one of the two.
    - `linear_solver`: any `lineax` solver, or [`bilevax.Neumann`][]. `lx.CG` (the default)
        and `lx.Cholesky` are applied to the normal equations $J^\top J x = J^\top b$ unless
        `symmetric=True` (jaxopt's default `solve_normal_cg`); `lx.GMRES`, `lx.BiCGStab` and
        `lx.LU()` solve the general system directly.
    - `symmetric`: whether $\partial_w F$ is symmetric positive semidefinite, as the Hessian of
        a convex loss is; then CG runs on $J$ itself and reverse mode reuses the same solve.
    - `has_aux`: whether `solve_fn` returns `(solution, aux)`; `aux` is returned as it is, not
        differentiated.

    **Returns:**

    A function with the signature of `solve_fn`.

    !!! example

        ```python
        def ridge(init, lam, X, y):  # any routine: here a closed form
            return jnp.linalg.solve(X.T @ X + lam * jnp.eye(X.shape[1]), X.T @ y)

        loss = lambda w, lam, X, y: 0.5 * jnp.sum((X @ w - y) ** 2) + 0.5 * lam * w @ w
        ridge = bx.implicit_diff(ridge, jax.grad(loss), symmetric=True)
        jax.grad(lambda lam: jnp.sum(ridge(None, lam, X, y)))(1.0)
        ```
    """
    check_callable("solve_fn", solve_fn)
    if (optimality_fn is None) == (fixed_point_fn is None):
        raise ValueError("give exactly one of `optimality_fn` and `fixed_point_fn`.")
    residual_fn: Callable
    if fixed_point_fn is not None:
        check_callable("fixed_point_fn", fixed_point_fn)
        residual_fn = _FixedPointResidual(fixed_point_fn)
        name = "fixed_point_fn"
    else:
        assert optimality_fn is not None
        check_callable("optimality_fn", optimality_fn)
        residual_fn = optimality_fn
        name = "optimality_fn"
    check_linear_solver(linear_solver)
    if not isinstance(symmetric, bool):
        raise TypeError(f"`symmetric` must be a bool, got {symmetric!r}.")
    if not symmetric:
        linear_solver = _general_solver(linear_solver)

    @functools.wraps(solve_fn)
    def wrapped(init, *args):
        # A Python float is differentiable (`jax.jacfwd(f)(1.0)` keeps it as the primal of a
        # tracer), but the custom JVP would take it for static: copy scalars into arrays.
        args = jax.tree.map(lambda x: jnp.array(x) if _is_inexact(x) else x, args)
        out = solve_fn(stop_gradient(init), *stop_gradient(args))
        solution, aux = out if has_aux else (out, None)
        float_solution, static_solution = eqx.partition(solution, eqx.is_inexact_array)
        if not jax.tree.leaves(float_solution):
            raise TypeError("`solve_fn` must return a pytree of floating-point arrays.")
        residual_shape = eqx.filter_eval_shape(residual_fn, solution, *args)
        check_same_structure(f"the output of `{name}`", residual_shape, solution, "the solution")
        fn = eqx.filter_closure_convert(residual_fn, solution, *args)
        float_solution = _implicit(
            stop_gradient(float_solution),
            (fn, args),
            optimality=_UserOptimality(static_solution),
            linear_solver=linear_solver,
            symmetric=symmetric,
        )
        solution = eqx.combine(float_solution, static_solution)
        return (solution, aux) if has_aux else solution

    return wrapped


def _is_inexact(x) -> bool:
    return isinstance(x, float | complex) or (eqx.is_inexact_array(x) and x.ndim == 0)


class _FixedPointResidual(eqx.Module):
    fixed_point_fn: Callable

    def __call__(self, params, *args):
        # w − T(w): its Jacobian I − ∂T suits `bx.Neumann` (the series Σ ∂Tᵏ) as it stands.
        return jax.tree.map(jnp.subtract, params, self.fixed_point_fn(params, *args))


class _GradientOptimality(eqx.Module):
    """$\\nabla_w L(w, \\lambda, \\text{data})$; `inputs = (inner_loss, hparams, data)`."""

    static_params: PyTree

    def __call__(self, params, inputs):
        inner_loss, hparams, data = inputs
        loss = lambda p: inner_loss(eqx.combine(p, self.static_params), hparams, data)
        return jax.grad(loss)(params)


class _SolverOptimality(eqx.Module):
    """The solver's residual; `inputs = (inner_loss, hparams, data, solver)`."""

    static_params: PyTree

    def __call__(self, params, inputs):
        inner_loss, hparams, data, solver = inputs
        loss = lambda p, args: inner_loss(eqx.combine(p, self.static_params), *args)
        args = (hparams, data)
        return solver.residual(loss, params, jax.grad(loss)(params, args), args)


class _UserOptimality(eqx.Module):
    """A user's `optimality_fn(solution, *args)`; `inputs = (closure_converted_fn, args)`."""

    static_solution: PyTree

    def __call__(self, params, inputs):
        fn, args = inputs
        residual = fn(eqx.combine(params, self.static_solution), *args)
        return eqx.filter(residual, eqx.is_inexact_array)


def _general_solver(linear_solver: lx.AbstractLinearSolver) -> lx.AbstractLinearSolver:
    # CG and Cholesky accept only a symmetric (positive definite) operator; for a general
    # Jacobian they run on the normal equations, as jaxopt's default `solve_normal_cg` does.
    if isinstance(linear_solver, lx.CG):
        return lx.Normal(linear_solver)
    if isinstance(linear_solver, lx.Cholesky):
        return lx.Normal(linear_solver)
    return linear_solver


@eqx.filter_custom_jvp
def _implicit(params_star, inputs, *, optimality, linear_solver, symmetric):
    del inputs, optimality, linear_solver, symmetric
    return params_star


@_implicit.def_jvp
def _implicit_jvp(primals, tangents, *, optimality, linear_solver, symmetric):
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
    )
    _, mixed = eqx.filter_jvp(
        lambda inputs: optimality(params_star, inputs), (inputs,), (inputs_tangent,)
    )
    jacobian = lx.JacobianLinearOperator(
        optimality, params_star, inputs, tags=HESSIAN_TAGS if symmetric else ()
    )
    rhs = jax.tree.map(jnp.negative, mixed)
    jacobian = lx.linearise(jacobian)
    # `lax.custom_linear_solve` transposes to our own solve (with J itself when symmetric).
    # Transposing `lx.linear_solve` directly would re-bind it with `throw=True`, so reverse
    # mode would raise on a solve that did not converge instead of returning what it has.
    solve = lambda _, b: lx.linear_solve(jacobian, b, linear_solver, throw=False).value
    if symmetric:
        params_tangent = jax.lax.custom_linear_solve(jacobian.mv, rhs, solve, symmetric=True)
    else:
        transposed = jacobian.transpose()
        transpose_solve = lambda _, b: (
            lx.linear_solve(transposed, b, linear_solver, throw=False).value
        )
        params_tangent = jax.lax.custom_linear_solve(jacobian.mv, rhs, solve, transpose_solve)
    return params_star, params_tangent
