import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, PyTree

from .._checks import check_int, check_real
from .._solver import as_inner_solver, check_solver


class AbstractPreconditioner(eqx.Module):
    """Builds a preconditioner for the Hessian solve of [`bilevax.implicit_hypergrad`][]:
    a positive definite `lineax` operator $P \\approx H^{-1}$."""

    @abc.abstractmethod
    def build(self, hessian: lx.AbstractLinearOperator, key: Array) -> lx.AbstractLinearOperator:
        """The operator $P \\approx H^{-1}$, from the (linearised) Hessian operator."""


class JacobiPreconditioner(AbstractPreconditioner):
    r"""Jacobi (diagonal) preconditioning, $P = \mathrm{diag}(d)^{-1}$, with the diagonal of
    the Hessian estimated by Hutchinson's estimator from Hessian-vector products:

    $$d \approx \frac{1}{S} \sum_{s=1}^{S} z_s \odot H z_s, \qquad z_s \in \{-1, 1\}^n
      \text{ uniformly},$$

    which is unbiased, since $\mathbb{E}[z z^\top] = I$. Entries below `floor` times the
    largest are raised to it, so that $P$ stays positive definite when the estimate is noisy.
    Helps when the Hessian's ill-conditioning comes from badly scaled coordinates (features
    on different scales); it cannot help a rotated ill-conditioned Hessian.

    **Arguments:**

    - `num_samples`: the number $S$ of Hessian-vector products.
    - `floor`: the smallest diagonal entry kept, relative to the largest.
    """

    num_samples: int = eqx.field(static=True, default=16)
    floor: float = eqx.field(static=True, default=1e-6)

    def __check_init__(self):
        check_int("num_samples", self.num_samples, 1)

    def build(self, hessian, key):
        structure = hessian.in_structure()
        leaves, treedef = jax.tree.flatten(structure)

        def sample(key):
            keys = jax.random.split(key, len(leaves))
            z = [jax.random.rademacher(k, s.shape, s.dtype) for k, s in zip(keys, leaves)]
            z = jax.tree.unflatten(treedef, z)
            return jax.tree.map(jnp.multiply, z, hessian.mv(z))

        estimates = jax.vmap(sample)(jax.random.split(key, self.num_samples))
        diag = jax.tree.map(lambda x: jnp.mean(x, axis=0), estimates)
        largest = jnp.max(jnp.asarray([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(diag)]))
        diag = jax.tree.map(lambda d: jnp.maximum(d, self.floor * largest), diag)
        inverse = lx.DiagonalLinearOperator(jax.tree.map(jnp.reciprocal, diag))
        return lx.TaggedLinearOperator(
            inverse, (lx.symmetric_tag, lx.positive_semidefinite_tag, lx.diagonal_tag)
        )


class QuasiNewtonPreconditioner(AbstractPreconditioner):
    r"""The inverse-Hessian approximation that a quasi-Newton inner solver built, as the
    preconditioner of the adjoint solve $H v = \nabla_w E$ at the solution it found
    (automatic preconditioning, Morales & Nocedal 2000): it costs no Hessian-vector product
    to build. The inner solver's approximation is positive definite (BFGS and L-BFGS update
    it only on positive curvature), so CG keeps its guarantees, and its stopping test is on
    the true residual, so the answer is as accurate as without it.

    It pays when the approximation is good: a dense `optx.BFGS`, whose matrix improves over
    the whole solve (and over the whole outer loop with `inner_solve(..., solver_state=...)`),
    halved the adjoint's CG iterations on a 30-feature problem; the ten curvature pairs of
    an `optx.LBFGS` on 2,000 features changed them by 1% (docs/performance.md, section 6).

    **Arguments:**

    - `solver`: the inner solver, as passed to [`bilevax.inner_solve`][]: an `optimistix`
        quasi-Newton minimiser that approximates the inverse Hessian (`optx.BFGS`,
        `optx.LBFGS`, with `use_inverse=True`, their default).
    - `state`: the solution's `state` ([`bilevax.Solution`][]).

    ```python
    sol = bx.inner_solve(inner_loss, init, hparams, data, solver=solver, tol=tol)
    linear_solver = bx.Preconditioned(
        bx.CG(rtol=tol, atol=0.0), bx.QuasiNewtonPreconditioner(solver, sol.state)
    )
    value, hypergrad = bx.implicit_hypergrad(
        outer_loss, inner_loss, sol.params, hparams, data, val_data, linear_solver=linear_solver
    )
    ```
    """

    solver: Any
    state: PyTree[Array]

    def __check_init__(self):
        check_solver(self.solver)
        if self.state is None:
            raise TypeError(
                "`state` must be the `state` of a `bx.inner_solve` solution with `solver`, got "
                f"{self.state!r}."
            )

    def build(self, hessian, key):
        del key
        inner_solver = as_inner_solver(self.solver, None)
        # The state's functions (L-BFGS's two-loop recursion) depend on the parameters'
        # structure only: an initial state at zeros supplies them.
        structure = hessian.in_structure()
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
        dtype = jnp.result_type(*jax.tree.leaves(zeros))
        initial = inner_solver.init(lambda params, args: jnp.zeros((), dtype), zeros, None)
        static = eqx.filter(initial, eqx.is_array, inverse=True)
        operator = inner_solver.inverse_hessian(eqx.combine(self.state, static))
        if operator is None:
            raise TypeError(
                "`QuasiNewtonPreconditioner` needs an inner solver that approximates the "
                "inverse Hessian, an `optimistix` quasi-Newton minimiser such as `optx.BFGS` "
                f"or `optx.LBFGS` (with `use_inverse=True`); got {self.solver!r}."
            )
        return lx.TaggedLinearOperator(operator, (lx.symmetric_tag, lx.positive_semidefinite_tag))


def build_preconditioner(
    preconditioner, hessian: lx.AbstractLinearOperator, key: Array
) -> lx.AbstractLinearOperator | None:
    if preconditioner is None:
        return None
    if isinstance(preconditioner, AbstractPreconditioner):
        return preconditioner.build(hessian, key)
    if isinstance(preconditioner, lx.AbstractLinearOperator):
        return preconditioner
    raise TypeError(
        "`preconditioner` must be None, a `bx.JacobiPreconditioner(...)` (or another "
        "`bx.AbstractPreconditioner`), or a positive definite `lineax` operator approximating "
        f"the inverse Hessian; got {type(preconditioner).__name__}."
    )


class Damped(lx.AbstractLinearSolver):
    r"""Solves the damped system $(A + \mu I) x = b$ with another `lineax` solver: the robust
    choice for a singular or nearly singular Hessian (Tikhonov damping, as in
    Levenberg–Marquardt). With $\mu > 0$ and $A$ positive semidefinite the system is positive
    definite, so `lx.CG` converges; the answer is biased by $O(\mu)$ towards the
    minimum-norm solution. An indefinite Hessian needs $\mu > -\lambda_{\min}(A)$; for an
    indefinite but non-singular Hessian, `lx.GMRES` or `lx.Normal(lx.CG(...))` solve the
    undamped system instead.

    **Arguments:**

    - `solver`: the `lineax` solver for the damped system, e.g. `lx.CG(rtol, atol)`.
    - `damping`: $\mu \ge 0$.
    """

    solver: lx.AbstractLinearSolver
    damping: ArrayLike

    def __check_init__(self):
        if not isinstance(self.solver, lx.AbstractLinearSolver):
            raise TypeError(f"`solver` must be a `lineax` solver, got {self.solver!r}.")
        check_real("damping", self.damping, lower=0)

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        identity = lx.IdentityLinearOperator(operator.in_structure())
        tags = tuple(
            tag
            for tag, holds in (
                (lx.symmetric_tag, lx.is_symmetric(operator)),
                (lx.positive_semidefinite_tag, lx.is_positive_semidefinite(operator)),
            )
            if holds
        )
        damped = lx.TaggedLinearOperator(operator + self.damping * identity, tags)
        return self.solver.init(damped, options)

    def compute(self, state, vector: PyTree[Array], options: dict[str, Any]):
        return self.solver.compute(state, vector, options)

    def transpose(self, state, options: dict[str, Any]):
        return self.solver.transpose(state, options)

    def conj(self, state, options: dict[str, Any]):
        return self.solver.conj(state, options)

    def assume_full_rank(self) -> bool:
        return True


class Preconditioned(lx.AbstractLinearSolver):
    r"""Another `lineax` solver with a preconditioner $P \approx A^{-1}$ built from the
    operator at each solve: preconditioning as an option of the linear solve, so every
    implicit path has it ([`bilevax.ImplicitAdjoint`][], [`bilevax.implicit_hypergrad`][],
    [`bilevax.implicit_diff`][], HOAG). The wrapped solver must accept a `preconditioner`
    option, as [`bilevax.CG`][] and `lx.CG` do.

    **Arguments:**

    - `solver`: the `lineax` solver, e.g. `bx.CG(rtol, atol)`.
    - `preconditioner`: a [`bilevax.JacobiPreconditioner`][] (or another
        [`bilevax.AbstractPreconditioner`][]), or a positive definite `lineax` operator.
    - `key`: a `jax.random.key` for a randomised preconditioner (Hutchinson's samples);
        default `jax.random.key(0)`.
    """

    solver: lx.AbstractLinearSolver
    preconditioner: AbstractPreconditioner | lx.AbstractLinearOperator
    key: Array | None = None

    def __check_init__(self):
        if not isinstance(self.solver, lx.AbstractLinearSolver):
            raise TypeError(f"`solver` must be a `lineax` solver, got {self.solver!r}.")
        if not isinstance(self.preconditioner, AbstractPreconditioner | lx.AbstractLinearOperator):
            raise TypeError(
                "`preconditioner` must be a `bx.JacobiPreconditioner(...)` (or another "
                "`bx.AbstractPreconditioner`), or a positive definite `lineax` operator "
                f"approximating the inverse; got {type(self.preconditioner).__name__}."
            )
        # A typed key, or a legacy `jax.random.PRNGKey(...)` (two uint32 words).
        dtype, shape = getattr(self.key, "dtype", None), getattr(self.key, "shape", None)
        typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        legacy = dtype == jnp.uint32 and shape == (2,)
        if self.key is not None and not (typed or legacy):
            raise TypeError(f"`key` must be None or a `jax.random.key(...)`, got {self.key!r}.")

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        key = jax.random.key(0) if self.key is None else self.key
        preconditioner = build_preconditioner(self.preconditioner, lx.linearise(operator), key)
        options = {**options, "preconditioner": preconditioner}
        return self.solver.init(operator, options), options

    def compute(self, state, vector: PyTree[Array], options: dict[str, Any]):
        state, own_options = state
        return self.solver.compute(state, vector, {**own_options, **options})

    def transpose(self, state, options: dict[str, Any]):
        state, own_options = state
        state, own_options = self.solver.transpose(state, own_options)
        return (state, own_options), options

    def conj(self, state, options: dict[str, Any]):
        state, own_options = state
        state, own_options = self.solver.conj(state, own_options)
        return (state, own_options), options

    def assume_full_rank(self) -> bool:
        return self.solver.assume_full_rank()
