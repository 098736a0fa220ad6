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

Both use one Jacobian operator (`linearized_optimality`), applied through JVPs only, and one
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
from ._misc import stop_gradient, tree_isfinite, tree_norm, tree_where_nan
from ._sharding import linear_operator, sharded_linear_solve
from ._solution import RESULTS, promote_linear_result


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


def linearized_optimality(
    optimality, params, inputs, *, symmetric: bool
) -> tuple[PyTree[Array], lx.AbstractLinearOperator]:
    r"""$F(w, \text{inputs})$ and $J = \partial_w F$ as a `lineax` operator, from one
    `jax.linearize` of $F$, after which each product is a linear pass (for the gradient
    condition, a Hessian-vector product, forward-over-reverse). $J$ is formed as a matrix
    only if a dense solver asks for one. Its input structure keeps the type of `params`,
    sharding included, so that it applies to sharded vectors (see `_sharding.py`)."""
    residual, jvp = jax.linearize(lambda w: optimality(w, inputs), params)
    return residual, linear_operator(jvp, params, tags=HESSIAN_TAGS if symmetric else ())


def jacobian_operator(optimality, params, inputs, *, symmetric: bool) -> lx.AbstractLinearOperator:
    r"""$J = \partial_w F(w, \text{inputs})$ alone (see `linearized_optimality`)."""
    return linearized_optimality(optimality, params, inputs, symmetric=symmetric)[1]


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
}
# What `lx.RESULTS.nonfinite_input` can mean, told apart by `_diagnosis`.
_NONFINITE_REASONS = (
    "met a non-finite (NaN or inf) right-hand side: the data, the hyperparameters or the inner "
    "solution (a diverged inner solve returns NaN parameters) are not finite, so no "
    "derivative exists",
    "was given a non-finite initial guess (`adjoint_init`)",
    "produced a non-finite answer from a finite system: the operator is singular (`lx.LU`, "
    "`lx.QR` on a singular Hessian), not positive definite where the solver needs it "
    "(`lx.Cholesky` at a saddle), or the solve overflowed",
)
_NOT_SYMMETRIC = (
    "failed on an operator declared symmetric that is not (⟨Au, Au⟩ ≠ ⟨u, A²u⟩): CG and "
    "`lx.Cholesky` need a symmetric operator; use `lx.GMRES`, `lx.BiCGStab` or "
    "`lx.Normal(bx.CG(...))`, or `implicit_diff(..., symmetric=False)`"
)
_FIXES = (
    " Raise the linear solver's `max_steps`, precondition it (`bx.Preconditioned`), damp it "
    "(`bx.Damped`), solve an indefinite system with `lx.GMRES`, `lx.BiCGStab` or "
    "`lx.Normal(bx.CG(...))` (the normal equations), solve the inner problem further, or pass "
    "`throw=False` to get NaN (or, for a solve cut short, its approximate answer) instead of "
    "this error."
)
_INNER_FAILED = (
    "The inner solve did not succeed (its `result` is not `successful`: it stopped at "
    "`max_steps` away from a stationary point, or went non-finite), and the theorem needs a "
    "solution: solve the inner problem further first (more `max_steps`, a larger step, "
    "a better solver). Then: "
)


def _messages() -> tuple[str, ...]:
    """The messages of `linear_solve`, indexed by `_diagnosis`: `lx.RESULTS`' own (its
    `nonfinite_input` split three ways), then the non-symmetric operator; the whole table
    again behind the inner solve's failure."""
    names = sorted(lx.RESULTS._name_to_item.items(), key=lambda kv: kv[1]._value)
    lead = "The linear solve of the implicit function theorem "
    table = []
    for name, _ in names:
        if name == "successful":
            table.append("")
        elif name == "nonfinite_input":
            table.append(lead + _NONFINITE_REASONS[0] + ". Pass `throw=False` to get NaN.")
        else:
            table.append(lead + (_FAILURE_REASONS.get(name) or name) + "." + _FIXES)
    table += [lead + reason + "." + _FIXES for reason in _NONFINITE_REASONS[1:]]
    table.append(lead + _NOT_SYMMETRIC + "." + _FIXES)
    return (*table, *(_INNER_FAILED + m if m else m for m in table))


_MESSAGES = _messages()
_NUM_RESULTS = len(lx.RESULTS._name_to_item)
_NONFINITE_Y0, _NONFINITE_ANSWER, _NOT_SYMMETRIC_CODE = range(_NUM_RESULTS, _NUM_RESULTS + 3)
_TABLE_SIZE = _NUM_RESULTS + 3


def _diagnosis(operator, vector, value, result, y0, inner_failed, check_symmetry):
    """An index into `_MESSAGES` saying why a solve failed, as precisely as is known."""
    code = result._value
    nonfinite = result == lx.RESULTS.nonfinite_input
    if y0 is not None:
        bad_start = tree_isfinite(vector) & ~tree_isfinite(y0)
        code = jnp.where(nonfinite & bad_start, _NONFINITE_Y0, code)
    answer_only = tree_isfinite(vector) & ~tree_isfinite(value)
    if y0 is not None:
        answer_only = answer_only & tree_isfinite(y0)
    code = jnp.where(nonfinite & answer_only, _NONFINITE_ANSWER, code)
    if check_symmetry:
        # Only a failed solve pays the two products of the check (under `vmap` both branches
        # run, which is why only a symmetry a user declared is checked).
        failed = (result != lx.RESULTS.successful) & ~nonfinite
        asymmetric = jax.lax.cond(
            failed, lambda: _is_not_symmetric(operator, vector), lambda: jnp.asarray(False)
        )
        code = jnp.where(asymmetric, _NOT_SYMMETRIC_CODE, code)
    if inner_failed is not None:
        code = jnp.where(inner_failed & (code != 0), code + _TABLE_SIZE, code)
    return code


def _is_not_symmetric(operator, u) -> Array:
    """Whether ⟨Au, Au⟩ and ⟨u, A²u⟩ differ beyond rounding: equal for a symmetric A."""
    au = operator.mv(u)
    a2u = operator.mv(au)
    dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    left, right = dot(au, au), dot(u, a2u)
    eps = jnp.finfo(jnp.result_type(left)).eps
    return jnp.abs(left - right) > 1e3 * eps * jnp.maximum(jnp.abs(left), jnp.abs(right))


def dtype_floor(params: PyTree[Array]) -> float:
    """The smallest relative tolerance a linear solve on `params` resolves: $10^{-10}$ in
    float64, $10^{-5}$ in float32, $10^{-2}$ below."""
    leaves = jax.tree.leaves(params)
    bits = max(jnp.finfo(x.dtype).bits for x in leaves) if leaves else 64
    return 1e-10 if bits >= 64 else 1e-5 if bits >= 32 else 1e-2


def default_linear_solver(params: PyTree[Array], tol: Any = None) -> lx.AbstractLinearSolver:
    r"""The linear solver of every implicit path that is not given one: [`bilevax.CG`][]
    stopping at $\|r\|_2 \le \mathrm{rtol}\,\|b\|_2$, with
    $\mathrm{rtol} = \max(\texttt{tol}, \text{floor})$ (the floor is `dtype_floor`).

    `tol` means one thing throughout bilevax: the tolerance to which the solution being
    differentiated is stationary, $\|F(w^*)\|_2 \le$ `tol`. [`bilevax.inner_solve`][] stops
    on it, so its solution is that accurate and no more, and its adjoint is made as accurate
    (`ImplicitAdjoint` passes it here; HOAG's schedule does the same in absolute terms).
    [`bilevax.implicit_hypergrad`][] and [`bilevax.implicit_diff`][] only check it
    (`stationarity_tol`) on a solution that may be far more accurate, a closed form: `None`
    here, and the solve runs at the floor; so do the diagnostics' own solves."""
    floor = dtype_floor(params)
    if tol is None:
        rtol = floor
    elif isinstance(tol, int | float):
        rtol = max(float(tol), floor)
    else:
        rtol = jnp.maximum(tol, floor)
    return CG(rtol=rtol, atol=0.0)


def stationarity_tol(params: PyTree[Array], tol: Any = None) -> Any:
    """The stationarity test of a solution given to bilevax: `tol`, or without one the loose
    test that still catches a point that is not a solution at all: $10^{-6}$ in float64 (the
    default stopping test of [`bilevax.inner_solve`][]), $10^{-3}$ below."""
    if tol is not None:
        return tol
    lowest = min((jnp.finfo(x.dtype).bits for x in jax.tree.leaves(params)), default=64)
    return 1e-6 if lowest >= 64 else 1e-3


def linear_solve(
    operator: lx.AbstractLinearOperator,
    vector: PyTree[Array],
    linear_solver: lx.AbstractLinearSolver,
    *,
    throw: bool,
    options: dict[str, Any] | None = None,
    inner_failed: Array | None = None,
    check_symmetry: bool = False,
) -> tuple[PyTree[Array], RESULTS, dict[str, Any]]:
    """`lx.linear_solve` under the failure policy.

    A non-finite right-hand side or answer is a failure (`lx.CG` returns its zero start on a
    NaN system and calls it a success). A failure raises with `throw=True`, with a message
    that says which of the causes it can tell apart (a non-finite system, initial guess or
    answer; with `check_symmetry`, an operator declared symmetric that is not; an inner solve
    that had failed, `inner_failed`, named first); with `throw=False` the answer is NaN,
    except for a solve cut short at its `max_steps`, whose approximate answer is kept
    (approximate is not failed) and flagged by the result, a [`bilevax.RESULTS`][].
    """
    value, result, stats = sharded_linear_solve(operator, vector, linear_solver, options)
    finite = tree_isfinite(vector) & tree_isfinite(value)
    result = lx.RESULTS.where(finite, result, lx.RESULTS.nonfinite_input)
    failed = result != lx.RESULTS.successful
    if throw:
        y0 = None if options is None else options.get("y0")
        code = _diagnosis(operator, vector, value, result, y0, inner_failed, check_symmetry)
        value = eqx.branched_error_if(value, failed, code, _MESSAGES)
    else:
        meaningless = failed & (result != lx.RESULTS.max_steps_reached)
        value = tree_where_nan(meaningless, value)
    return value, promote_linear_result(result), stats


def implicit_solution(
    params_star: PyTree[Array],
    optimality,
    inputs,
    linear_solver: lx.AbstractLinearSolver,
    *,
    symmetric: bool,
    throw: bool,
    root_tol: float | None = None,
    inner_failed: Array | None = None,
    declared_symmetric: bool = False,
    check=None,
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
    - `root_tol`: if given, the derivative is only taken where $\|F(w^*)\|_2 \le$
        `root_tol`: at a point that is not a root the theorem says nothing, so the
        derivative raises (`throw=True`) or is NaN. `None` (the inner solves, whose own
        result says how far from stationary they stopped) checks nothing.
    - `inner_failed`: whether the inner solve that gave `params_star` failed; a failed
        linear solve then names that first, as its likely cause.
    - `declared_symmetric`: `symmetric` is a user's claim (`implicit_diff`), not a Hessian's
        property: a failed solve then checks it, and says so if it is false.
    - `check`: with `root_tol`, a test of the point beyond $F = 0$, `(params, inputs,
        root_tol) -> RESULTS` (an Equinox module): where it is not `successful` the theorem
        does not apply (a weakly active constraint of a KKT system, whose $J$ is singular),
        and the derivative raises that result's message (`throw=True`) or is NaN.
    """
    return _implicit(
        stop_gradient(params_star),
        inputs,
        optimality=optimality,
        linear_solver=linear_solver,
        symmetric=symmetric,
        throw=throw,
        root_tol=root_tol,
        inner_failed=inner_failed,
        declared_symmetric=declared_symmetric,
        check=check,
    )


@eqx.filter_custom_jvp
def _implicit(
    params_star,
    inputs,
    *,
    optimality,
    linear_solver,
    symmetric,
    throw,
    root_tol,
    inner_failed,
    declared_symmetric,
    check,
):
    del inputs, optimality, linear_solver, symmetric, throw, root_tol, inner_failed
    del declared_symmetric, check
    return params_star


@_implicit.def_jvp
def _implicit_jvp(
    primals,
    tangents,
    *,
    optimality,
    linear_solver,
    symmetric,
    throw,
    root_tol,
    inner_failed,
    declared_symmetric,
    check,
):
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
        root_tol=root_tol,
        inner_failed=inner_failed,
        declared_symmetric=declared_symmetric,
        check=check,
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
    refuse = lambda x: x
    if root_tol is not None:
        refuse = _Refusal(*_no_derivative(optimality, params_star, inputs, root_tol, check), throw)
    # `lax.custom_linear_solve` transposes to our own checked solve (with J itself when
    # symmetric), so reverse mode is the adjoint form under the same failure policy. The
    # refusal is part of both solves, so that reverse mode under `jit`, which runs only the
    # transposed one, refuses too.
    solve = lambda _, b: refuse(
        linear_solve(
            jacobian,
            b,
            linear_solver,
            throw=throw,
            inner_failed=inner_failed,
            check_symmetry=declared_symmetric and symmetric,
        )[0]
    )
    if symmetric:
        params_tangent = jax.lax.custom_linear_solve(jacobian.mv, rhs, solve, symmetric=True)
    else:
        transposed = jacobian.transpose()
        transpose_solve = lambda _, b: refuse(
            linear_solve(transposed, b, linear_solver, throw=throw, inner_failed=inner_failed)[0]
        )
        params_tangent = jax.lax.custom_linear_solve(jacobian.mv, rhs, solve, transpose_solve)
    return params_star, params_tangent


def _no_derivative(optimality, params_star, inputs, root_tol, check) -> tuple[Array, RESULTS]:
    """Whether `params_star` is not a root of the optimality condition to `root_tol`, and the
    result of `check` there: where either fails the theorem gives no derivative."""
    params_star, inputs = stop_gradient((params_star, inputs))
    residual = tree_norm(optimality(params_star, inputs))
    # A NaN residual is left to the linear solve, whose message says "non-finite".
    not_root = residual > root_tol
    result = RESULTS.successful if check is None else check(params_star, inputs, root_tol)
    return not_root, result


class _Refusal(eqx.Module):
    """A linear solve's answer, refused (`throw`) or NaN where the theorem gives no
    derivative (see `_no_derivative`)."""

    not_root: Array
    result: RESULTS
    throw: bool = eqx.field(static=True)

    def __call__(self, x: PyTree[Array]) -> PyTree[Array]:
        failed = self.result != RESULTS.successful
        if self.throw:
            # The point's own defect (a weakly active constraint) is named only at a root:
            # away from one, the message that says so comes first.
            x = self.result.error_if(x, ~self.not_root & failed)
            return eqx.error_if(
                x,
                self.not_root,
                "implicit_diff: the solution `solve_fn` returned is not a root of the "
                "optimality condition (‖F(w*)‖ > `tol`), so the implicit function theorem "
                "gives no derivative there. Solve further, pass the `tol` the solution is "
                "accurate to, or `throw=False` to get NaN derivatives instead of this error.",
            )
        # A factor, not an added NaN: the solve must stay linear in its right-hand side.
        refused = self.not_root | failed
        factor = lambda x: jnp.where(refused, jnp.asarray(jnp.nan, x.dtype), jnp.ones((), x.dtype))
        return jax.tree.map(lambda x: x * factor(x), x)


def adjoint_solve(
    jacobian: lx.AbstractLinearOperator,
    outer_grad: PyTree[Array],
    linear_solver: lx.AbstractLinearSolver,
    *,
    throw: bool,
    adjoint_init: PyTree[Array] | None = None,
) -> tuple[PyTree[Array], RESULTS, dict[str, Any]]:
    r"""The adjoint $v = J^{-\top} \nabla_w E$ by one checked linear solve: what reverse mode
    through `implicit_solution` computes, returned so that it can be inspected, reused as
    a warm start (HOAG), or fed to the diagnostics; `adjoint_init` is the linear solver's
    initial guess (its `y0` option). Returns `(v, result, stats)`."""
    operator = jacobian if lx.is_symmetric(jacobian) else jacobian.transpose()
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
        # `w is None`: a part of the solution with no arrays (a KKT point's absent multipliers).
        if m is not None or w is None:
            return m
        linear_zero = 0 * sum(jnp.sum(x).astype(w.dtype) for x in leaves)
        return jnp.broadcast_to(linear_zero, w.shape)

    return jax.tree.map(leaf, mixed, params, is_leaf=_is_none)
