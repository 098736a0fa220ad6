import functools
import inspect
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import PyTree

from ._checks import (
    check_bool,
    check_callable,
    check_linear_solver,
    check_real,
    check_same_structure,
)
from ._flax import check_flax_params
from ._ift import default_linear_solver, general_solver, implicit_solution, stationarity_tol
from ._kkt import KKTOptimality, complementarity_result
from ._misc import scalars_as_arrays, stop_gradient


def implicit_diff(
    solve_fn: Callable,
    optimality_fn: Callable | None = None,
    *,
    fixed_point_fn: Callable | None = None,
    linear_solver: lx.AbstractLinearSolver | None = None,
    symmetric: bool = False,
    has_aux: bool = False,
    throw: bool = True,
    tol=None,
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
    - `linear_solver`: any `lineax` solver, or [`bilevax.Neumann`][]. The default is
        [`bilevax.CG`][] at the floor of the solution's dtype ($10^{-10}$ in float64,
        $10^{-5}$ in float32): `tol` is only checked, and the solution may be more
        accurate. CG and `lx.Cholesky` are applied to the normal equations
        $J^\top J x = J^\top b$ unless `symmetric=True` (jaxopt's default `solve_normal_cg`);
        `lx.GMRES`, `lx.BiCGStab` and `lx.LU()` solve the general system directly.
    - `symmetric`: whether $\partial_w F$ is symmetric positive semidefinite, as the Hessian of
        a convex loss is; then CG runs on $J$ itself and reverse mode reuses the same solve.
    - `has_aux`: whether `solve_fn` returns `(solution, aux)`; `aux` is returned as it is, not
        differentiated.
    - `throw`: whether a failed linear solve raises (the default), or gives NaN
        derivatives (an approximate one for a solve cut short at its `max_steps`): the
        failure policy of the docs' "Failures" page. It also covers a solution that is not
        a root: see `tol`. With [`bilevax.kkt_optimality`][] it also covers a KKT point
        where the theorem does not apply: a weakly active constraint
        (`RESULTS.degenerate_complementarity`) or a negative multiplier
        (`RESULTS.kkt_infeasible`).
    - `tol`: the derivative is taken only where $\|F(w^*, \text{args})\|_2 \le$ `tol` (one
        more evaluation of $F$ per derivative): at a point that is not a root the theorem
        gives no derivative, so it raises (`throw=True`) or is NaN, never the derivative of
        a root that is not there. The default is $10^{-6}$ in float64 (the stopping test of
        [`bilevax.inner_solve`][]) and $10^{-3}$ in lower precision; pass the accuracy of an
        approximate solver, or `jnp.inf` to check nothing.

    **Returns:**

    A function with the signature of `solve_fn`: arguments after `init` may be passed by
    position or by keyword.

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
    if linear_solver is not None:
        check_linear_solver(linear_solver)
    check_bool("symmetric", symmetric)
    check_bool("has_aux", has_aux)
    check_bool("throw", throw)
    if tol is not None:
        check_real("tol", tol, lower=0)
    signature = _signature(solve_fn)

    @functools.wraps(solve_fn)
    def wrapped(init, *args, **kwargs):
        args = _positional(signature, init, args, kwargs)
        args = scalars_as_arrays(args)
        out = solve_fn(stop_gradient(init), *stop_gradient(args))
        solution, aux = out if has_aux else (out, None)
        solution = attach_derivative(
            solution,
            residual_fn,
            args,
            name=name,
            linear_solver=linear_solver,
            symmetric=symmetric,
            throw=throw,
            tol=stationarity_tol(eqx.filter(solution, eqx.is_inexact_array), tol),
        )
        return (solution, aux) if has_aux else solution

    return wrapped


def attach_derivative(
    solution, residual_fn, args: tuple, *, name: str, linear_solver, symmetric: bool, throw, tol
):
    """`solution`, a root of `residual_fn(solution, *args)`, with the derivative of the
    theorem attached (`implicit_diff`'s body; [`bilevax.solve_qp`][] calls it too, with the
    `tol` its own stopping test warrants: negative refuses every derivative)."""
    check_flax_params("solution", solution)
    float_solution, static_solution = eqx.partition(solution, eqx.is_inexact_array)
    if not jax.tree.leaves(float_solution):
        raise TypeError("`solve_fn` must return a pytree of floating-point arrays.")
    residual_shape = eqx.filter_eval_shape(residual_fn, solution, *args)
    check_same_structure(f"the output of `{name}`", residual_shape, solution, "the solution")
    fn = eqx.filter_closure_convert(residual_fn, solution, *args)
    inputs, check = (fn, args), None
    if isinstance(residual_fn, KKTOptimality) and residual_fn.ineq_constraints is not None:
        inequalities = eqx.filter_closure_convert(residual_fn.inequalities, solution, *args)
        inputs, check = (fn, args, inequalities), _ComplementarityCheck(static_solution)
    solver = linear_solver
    if solver is None:
        solver = default_linear_solver(float_solution)
    float_solution = implicit_solution(
        float_solution,
        _UserOptimality(static_solution),
        inputs,
        solver if symmetric else general_solver(solver),
        symmetric=symmetric,
        throw=throw,
        root_tol=tol,
        declared_symmetric=symmetric,
        check=check,
    )
    return eqx.combine(float_solution, static_solution)


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _positional(signature, init, args, kwargs) -> tuple:
    """The arguments after `init` as one positional tuple, bound by `solve_fn`'s signature, so
    that keyword arguments are differentiated like positional ones and reach `optimality_fn`
    in the same order (as in jaxopt)."""
    if not kwargs:
        return args
    if signature is None:
        raise TypeError(
            "keyword arguments need a `solve_fn` whose signature `inspect.signature` can read; "
            "pass the arguments by position instead."
        )
    try:
        bound = signature.bind(init, *args, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"the arguments do not match the signature of `solve_fn`: {error}"
        ) from error
    bound.apply_defaults()
    if bound.kwargs:
        raise TypeError(
            "`solve_fn` has keyword-only parameters "
            f"({', '.join(bound.kwargs)}); implicit_diff needs them positional-or-keyword."
        )
    return tuple(bound.args[1:])


class _FixedPointResidual(eqx.Module):
    fixed_point_fn: Callable

    def __call__(self, params, *args):
        # w − T(w): its Jacobian I − ∂T suits `bx.Neumann` (the series Σ ∂Tᵏ) as it stands.
        return jax.tree.map(jnp.subtract, params, self.fixed_point_fn(params, *args))


class _UserOptimality(eqx.Module):
    """A user's `optimality_fn(solution, *args)`; `inputs = (closure_converted_fn, args)`."""

    static_solution: PyTree

    def __call__(self, params, inputs):
        fn, args = inputs[:2]
        residual = fn(eqx.combine(params, self.static_solution), *args)
        return eqx.filter(residual, eqx.is_inexact_array)


class _ComplementarityCheck(eqx.Module):
    """Whether the theorem applies at a KKT point (see `complementarity_result`);
    `inputs = (closure_converted_fn, args, closure_converted_inequalities)`."""

    static_solution: PyTree

    def __call__(self, params, inputs, tol):
        _, args, inequalities = inputs
        solution = eqx.combine(params, self.static_solution)
        return complementarity_result(solution[2], inequalities(solution, *args), tol)
