"""A precision policy: the inner loop in low precision, the hypergradient in high precision."""

from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from .._custom_types import Data, HParams, Params
from .._implicit import implicit_hypergrad
from .._inner_solve import inner_solve
from .._solution import HypergradInfo
from .._solver import GradientDescent, SolverLike


class PrecisionPolicy(eqx.Module):
    r"""Which floating-point type each stage of a hypergradient computation runs in.

    The inner solve is the expensive, forgiving part (thousands of steps that only need to
    land near $w^*$); the adjoint solve $H v = \nabla_w E$ and the final vector-Jacobian
    product are few and need accuracy (CG breaks down in low precision on ill-conditioned
    Hessians). So `inner_dtype` may be `bfloat16`, `float16` or `float32`, and `solve_dtype`
    `float32` or `float64`. The hypergradient's extra error is that of stopping the inner
    solve at $\|\nabla_w L\| \approx$ the low precision's resolution: first order in it, as
    [`bilevax.diagnostics.HypergradDiagnostics`][]'s `error_estimate` measures.

    **Arguments:**

    - `inner_dtype`: the type of the parameters, hyperparameters and data in the inner loop.
    - `solve_dtype`: the type of everything in the hypergradient computation.
    """

    inner_dtype: Any = eqx.field(static=True, default=jnp.float32)
    solve_dtype: Any = eqx.field(static=True, default=jnp.float64)

    def __check_init__(self):
        for name in ("inner_dtype", "solve_dtype"):
            dtype = getattr(self, name)
            try:
                ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
            except TypeError:
                ok = False
            if not ok:
                raise TypeError(f"`{name}` must be a floating-point dtype, got {dtype!r}.")

    def cast(self, tree, dtype):
        """Casts the floating-point arrays of `tree` to `dtype` (other leaves unchanged)."""
        if jnp.dtype(dtype).itemsize == 8 and not jax.config.read("jax_enable_x64"):
            raise ValueError(
                f"`{jnp.dtype(dtype).name}` in a `PrecisionPolicy` needs "
                '`jax.config.update("jax_enable_x64", True)`.'
            )
        cast = lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x
        return jax.tree.map(cast, tree)

    def inner(self, tree):
        """`tree` in `inner_dtype`."""
        return self.cast(tree, self.inner_dtype)

    def solve(self, tree):
        """`tree` in `solve_dtype`."""
        return self.cast(tree, self.solve_dtype)


def mixed_precision_hypergrad(
    outer_loss,
    inner_loss,
    init: Params,
    hparams: HParams,
    inner_data: Data = None,
    outer_data: Data = None,
    *,
    policy: PrecisionPolicy = PrecisionPolicy(),
    solver: SolverLike = GradientDescent(0.1),
    max_steps: int = 1000,
    tol=1e-6,
    linear_solver: lx.AbstractLinearSolver = lx.CG(rtol=1e-10, atol=1e-10),
    has_aux: bool = False,
):
    r"""Solves the inner problem in `policy.inner_dtype`, then computes the implicit
    hypergradient at its solution in `policy.solve_dtype`.

    **Arguments:**

    - `outer_loss`, `inner_loss`, `hparams`, `inner_data`, `outer_data`: as for
        [`bilevax.implicit_hypergrad`][].
    - `init`: the inner solver's starting point.
    - `policy`: a [`bilevax.contrib.PrecisionPolicy`][].
    - `solver`, `max_steps`, `tol`: as for [`bilevax.inner_solve`][] (run in
        `inner_dtype`; a `tol` below that type's resolution ends at `max_steps`).
    - `linear_solver`: as for [`bilevax.implicit_hypergrad`][] (run in `solve_dtype`).
    - `has_aux`: also return the [`bilevax.HypergradInfo`][] (computed in
        `solve_dtype`).

    **Returns:**

    `(value, hypergrad, solution)`, with `solution` the low-precision
    [`bilevax.Solution`][]; `(value, hypergrad, solution, info)` with `has_aux=True`.
    `value` and `hypergrad` are in `solve_dtype`.
    """
    solution = inner_solve(
        inner_loss,
        policy.inner(init),
        policy.inner(hparams),
        policy.inner(inner_data),
        solver=solver,
        max_steps=max_steps,
        tol=tol,
    )
    out = implicit_hypergrad(
        outer_loss,
        inner_loss,
        policy.solve(solution.params),
        policy.solve(hparams),
        policy.solve(inner_data),
        policy.solve(outer_data),
        linear_solver=linear_solver,
        has_aux=has_aux,
        tol=tol,
    )
    if has_aux:
        value, hypergrad, info = cast(tuple[Any, Any, HypergradInfo], out)
        return value, hypergrad, solution, info
    value, hypergrad = cast(tuple[Any, Any], out)
    return value, hypergrad, solution
