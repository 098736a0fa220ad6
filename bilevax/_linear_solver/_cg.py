import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree, Scalar

from .._checks import check_real


class _CGState(eqx.Module):
    operator: lx.AbstractLinearOperator
    negate: bool = eqx.field(static=True)


def _dot(a: PyTree[Array], b: PyTree[Array]) -> Scalar:
    products = [jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return functools.reduce(jnp.add, products)


def _max_abs(tree: PyTree[Array]) -> Scalar:
    """The largest magnitude over all leaves (no squares: it cannot underflow), real."""
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree) if x.size]
    if not leaves:
        return jnp.asarray(0.0)
    dtype = jnp.result_type(*leaves)
    return functools.reduce(jnp.maximum, [x.astype(dtype) for x in leaves])


def _axpy(alpha, x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    """`alpha * x + y`, leaf by leaf."""
    return jax.tree.map(lambda x, y: alpha * x + y, x, y)


class CG(lx.AbstractLinearSolver[_CGState]):
    r"""Conjugate gradients for a symmetric positive (or negative) definite operator, with
    one operator application per iteration and nothing else: a lean `lineax` solver for the
    Hessian solves of implicit hypergradients.

    It computes the same Krylov iterates as `lx.CG` and `jax.scipy.sparse.linalg.cg`, and
    differs from `lx.CG` in what it leaves out:

    - no operator application for the initial residual when there is no `y0` (it is $b$);
    - no periodic re-computation of the residual from scratch (`lx.CG`'s `stabilise_every`,
        one extra application every 10 steps), which in float64 on the well-conditioned
        systems of hyperparameter optimisation changes nothing measurable;
    - a 2-norm stopping rule, as SciPy's and jaxopt's:
        $\|b - A y_k\|_2 \le \max(\mathrm{atol}, \mathrm{rtol}\,\|b\|_2)$, instead of a
        per-component max-norm test on both the residual and the last update.

    The `options` of `lx.linear_solve` may hold a `preconditioner` (a positive definite
    `lx.AbstractLinearOperator`) and `y0` (the initial estimate; zero by default).

    **Arguments:**

    - `rtol`, `atol`: the relative and absolute tolerances of the stopping rule above.
    - `max_steps`: the iteration limit; `None` means ten times the size of the system, as in
        SciPy. With `rtol = atol = 0` exactly `max_steps` iterations run (fewer only if the
        residual is exactly zero).

    The result is `lx.RESULTS.successful` when the stopping rule holds,
    `lx.RESULTS.max_steps_reached` when the limit was hit first (with `rtol = atol = 0`,
    running `max_steps` iterations counts as success), and `lx.RESULTS.breakdown` when an
    iteration meets a direction of non-positive curvature, $p^\top A p \le 0$: the
    operator is not positive definite (a Hessian away from a strict minimiser), and CG's
    answer would mean nothing. The statistics are `num_steps` and `max_steps`.
    """

    rtol: float | Array
    atol: float | Array
    max_steps: int | None = None

    def __check_init__(self):
        check_real("rtol", self.rtol, lower=0)
        check_real("atol", self.atol, lower=0)
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool)
            or not isinstance(self.max_steps, int)
            or self.max_steps < 0
        ):
            raise ValueError(f"`max_steps` must be None or an int >= 0, got {self.max_steps!r}.")
        if self._no_tolerance() and self.max_steps is None:
            raise ValueError("`CG` needs `rtol`, `atol` or `max_steps`: all are zero or None.")

    def _no_tolerance(self) -> bool:
        return (
            isinstance(self.rtol, int | float)
            and isinstance(self.atol, int | float)
            and self.rtol == 0
            and self.atol == 0
        )

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]) -> _CGState:
        del options
        if operator.in_structure() != operator.out_structure():
            raise ValueError("`CG` needs a square operator (in structure == out structure).")
        negate = lx.is_negative_semidefinite(operator)
        if not (lx.is_positive_semidefinite(operator) or negate):
            raise ValueError(
                "`CG` needs an operator tagged positive or negative (semi)definite, e.g. "
                "`tags=(lx.symmetric_tag, lx.positive_semidefinite_tag)`."
            )
        operator = lx.linearise(-operator if negate else operator)
        return _CGState(operator, negate)

    def compute(
        self, state: _CGState, vector: PyTree[Array], options: dict[str, Any]
    ) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
        operator = state.operator
        preconditioner = options.get("preconditioner")
        if preconditioner is not None:
            if not isinstance(preconditioner, lx.AbstractLinearOperator):
                raise TypeError("The `preconditioner` option must be a lineax linear operator.")
            preconditioner = lx.linearise(preconditioner)
        apply_m = (lambda r: r) if preconditioner is None else preconditioner.mv
        size = sum(x.size for x in jax.tree.leaves(vector))
        max_steps = 10 * size if self.max_steps is None else self.max_steps

        # CG runs on A (y/s) = b/s with s ≈ max|b|, as LAPACK's `nrm2` scales its sum of
        # squares: ‖b‖² of a tiny b (data scaled by 1e-100 in float64, 1e-10 in float32)
        # would underflow to zero and CG return its zero start as a solution; of a huge one,
        # overflow. s is a power of two, so the scaling is exact and the iterates are those
        # of the unscaled system wherever that one does not under- or overflow.
        scale = _max_abs(vector)
        usable = (scale > 0) & jnp.isfinite(scale)
        scale = jnp.exp2(jnp.round(jnp.log2(jnp.where(usable, scale, jnp.ones_like(scale)))))
        unscale = lambda tree: jax.tree.map(lambda x: x / scale.astype(x.dtype), tree)
        vector = unscale(vector)
        y0 = options.get("y0")
        if y0 is None:
            y = jax.tree.map(jnp.zeros_like, vector)
            r = vector
        else:
            if jax.tree.structure(y0) != jax.tree.structure(vector):
                raise ValueError("The `y0` option must have the structure of the vector.")
            y = unscale(y0)
            r = jax.tree.map(jnp.subtract, vector, operator.mv(y))
        z = apply_m(r)
        p = z
        gamma = _dot(r, z)
        rr = gamma if preconditioner is None else _dot(r, r)
        b_norm = jnp.sqrt(_dot(vector, vector))
        threshold = jnp.maximum(self.atol / scale, self.rtol * b_norm) ** 2

        def cond(carry):
            _, _, _, gamma, rr, step, curvature = carry
            # `gamma > 0` stops at an exact solution (and on a breakdown) with no 0/0.
            return (step < max_steps) & (rr > threshold) & (gamma > 0) & (curvature > 0)

        def body(carry):
            y, r, p, gamma, _, step, _ = carry
            ap = operator.mv(p)
            curvature = _dot(p, ap)
            alpha = gamma / jnp.where(curvature > 0, curvature, 1)
            y = _axpy(alpha, p, y)
            r = _axpy(-alpha, ap, r)
            z = apply_m(r)
            gamma_new = _dot(r, z)
            rr = gamma_new if preconditioner is None else _dot(r, r)
            p = _axpy(gamma_new / gamma, p, z)
            return y, r, p, gamma_new, rr, step + 1, curvature

        # The counter and the last curvature are made from `b_norm` (not fresh constants) so
        # that they take the batch's sharding when vmapped over tasks on an `Explicit` mesh.
        step0 = jnp.zeros_like(b_norm, dtype=jnp.int32)
        carry = (y, r, p, gamma, rr, step0, jnp.ones_like(b_norm))
        y, _, _, _, rr, num_steps, curvature = jax.lax.while_loop(cond, body, carry)
        y = jax.tree.map(lambda x: x * scale.astype(x.dtype), y)
        if state.negate:
            y = jax.tree.map(jnp.negative, y)
        finite = jnp.isfinite(rr) & jnp.isfinite(curvature)
        converged = (rr <= threshold) | jnp.asarray(self._no_tolerance())
        result = lx.RESULTS.where(converged, lx.RESULTS.successful, lx.RESULTS.max_steps_reached)
        result = lx.RESULTS.where(curvature > 0, result, lx.RESULTS.breakdown)
        result = lx.RESULTS.where(finite, result, lx.RESULTS.nonfinite_input)
        return y, result, {"num_steps": num_steps, "max_steps": self.max_steps}

    def transpose(self, state: _CGState, options: dict[str, Any]):
        # The operator is symmetric (a definite operator for CG), so it is its own transpose.
        options = dict(options)
        if "preconditioner" in options:
            options["preconditioner"] = options["preconditioner"].transpose()
        return state, options

    def conj(self, state: _CGState, options: dict[str, Any]):
        options = dict(options)
        if "preconditioner" in options:
            options["preconditioner"] = lx.conj(options["preconditioner"])
        return _CGState(lx.conj(state.operator), state.negate), options

    def assume_full_rank(self) -> bool:
        return True
