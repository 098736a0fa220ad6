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

Both use one Jacobian operator ([`jacobian_operator`][]), applied through JVPs only, and one
checked linear solve ([`linear_solve`][]) that carries the failure policy: a solve that failed
raises, or (with `throw=False`) returns NaN where its answer is meaningless.
"""

from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from ._misc import stop_gradient, tree_isfinite, tree_where_nan


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


def _structure(x: Array) -> jax.ShapeDtypeStruct:
    # The sharding is kept (where the array has one), so that the operator's input
    # structure matches the sharded vectors it is applied to: under an `Explicit` or `Auto`
    # mesh, and inside `shard_map` (a manual mesh). The manual axes an array varies over are
    # not: lineax drops them from every structure (see `_VaryingJVP`).
    sharding = getattr(jax.typeof(x), "sharding", None) if hasattr(jax, "typeof") else None
    try:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    except Exception:
        return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _varying_axes(x) -> frozenset:
    """The manual axes of `shard_map` over which `x` varies (empty outside `shard_map`, and
    inside one that does not check them)."""
    aval = jax.typeof(x) if hasattr(jax, "typeof") else None
    manual = getattr(aval, "mat", None)  # JAX >= 0.9
    varying = getattr(manual, "varying", None) if manual is not None else getattr(aval, "vma", None)
    return frozenset(varying or ())


def _pcast_varying(x, axes: tuple[str, ...]):
    missing = tuple(axis for axis in axes if axis not in _varying_axes(x))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)  # pyright: ignore[reportAttributeAccessIssue]


class _VaryingJVP(eqx.Module):
    """`jax.linearize`'s JVP, accepting tangents that do not vary over the manual axes that
    its primal varies over (inside a `shard_map` that checks them).

    lineax keeps an operator's structure without those axes, and traces the operator on it
    (for its output structure); the JVP then refuses the invariant tangent ("linearized
    function called on tangent values inconsistent with the original primal values"). Each
    tangent leaf is cast to varying over the axes it lacks, which is no cast at all on the
    vectors of a solve, which already vary."""

    jvp: Any  # a pytree of the linearisation's residuals
    axes: tuple[tuple[str, ...], ...] = eqx.field(static=True)  # per leaf, sorted

    def __call__(self, tangent):
        leaves, treedef = jax.tree.flatten(tangent)
        leaves = [_pcast_varying(x, axes) for x, axes in zip(leaves, self.axes, strict=True)]
        return self.jvp(jax.tree.unflatten(treedef, leaves))


class _VaryingJacobian(lx.FunctionLinearOperator):
    """The operator of a `_VaryingJVP`, whose output structure is traced with the JVP's
    residuals as they are: lineax traces it with `eqx.cached_filter_eval_shape`, which retypes
    every array it is given (the residuals too) without the manual axes it varies over, and
    the linear pass then meets a varying tangent and an invariant residual ("requires varying
    manual axes to match")."""

    def out_structure(self):
        # (A lambda: `jax.eval_shape` keys a cache on the function, and a module holding
        # tracers cannot be compared.)
        out = jax.eval_shape(lambda vector: self.fn(vector), self.in_structure())
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), out
        )


def jacobian_operator(optimality, params, inputs, *, symmetric: bool) -> lx.AbstractLinearOperator:
    r"""$J = \partial_w F(w, \text{inputs})$ as a `lineax` operator, linearised once: one
    `jax.linearize` of $F$, after which each product is a linear pass (for the gradient
    condition, a Hessian-vector product, forward-over-reverse). It is formed as a matrix only
    if a dense solver asks for one.

    Its input structure keeps the type of `params`, sharding included, so that the operator
    applies to sharded vectors: under an `Explicit` or `Auto` mesh, and inside `shard_map`
    (where the JVP is wrapped so that it accepts tangents that lineax has typed as invariant
    over the manual axes, see `_VaryingJVP`)."""
    _, jvp = jax.linearize(lambda w: optimality(w, inputs), params)
    structure = jax.tree.map(_structure, params)
    tags = HESSIAN_TAGS if symmetric else ()
    axes = tuple(tuple(sorted(_varying_axes(x))) for x in jax.tree.leaves(params))
    if not any(axes):
        return lx.FunctionLinearOperator(jvp, structure, tags=tags)
    # Not closure-converted: a jaxpr traced on lineax's invariant structure would cast
    # tangents that already vary. `_VaryingJVP` is a pytree of its arrays, as closure
    # conversion would make it.
    return _VaryingJacobian(
        _VaryingJVP(jvp, axes),
        structure,
        tags=tags,
        closure_convert=False,  # pyright: ignore[reportCallIssue]
    )


def _mesh_typed(tree: PyTree[Array]) -> bool:
    """Whether any leaf's type carries a mesh (an `Auto` or `Explicit` one, or `shard_map`'s
    manual axes), or a mesh is set for the trace."""
    if not hasattr(jax, "typeof"):
        return False
    avals = [jax.typeof(x) for x in jax.tree.leaves(tree)]
    meshes = [getattr(getattr(aval, "sharding", None), "mesh", None) for aval in avals]
    get_abstract_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    if get_abstract_mesh is not None:
        meshes.append(get_abstract_mesh())
    return any(mesh is not None and not mesh.empty for mesh in meshes)


def _solve(
    operator: lx.AbstractLinearOperator,
    vector: PyTree[Array],
    linear_solver: lx.AbstractLinearSolver,
    options: dict[str, Any] | None,
) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
    """`lx.linear_solve(..., throw=False)` as `(value, result, stats)`, keeping shardings.

    On arrays typed with a mesh, lineax's primitive cannot be used: its abstract evaluation
    (and equinox's `vprim` batching of it) rebuilds every output type without its sharding,
    so that under a `vmap` over an `Explicit` mesh axis the answer comes out typed on an
    empty mesh ("Resource axis: ... is not found in mesh: ()" on the next operation), and
    inside `shard_map` the operator, typed on the manual mesh, rejects the stripped vectors
    ("Closure-converted function called with different dynamic arguments"). There the solver
    runs on the vectors themselves, in `lax.custom_linear_solve` for its derivatives (the
    implicit ones of a linear solve, as lineax's), so every type, sharding included, is
    propagated by JAX. Elsewhere it is `lx.linear_solve`."""
    options = {} if options is None else options
    if not _mesh_typed(vector):
        solution = lx.linear_solve(operator, vector, linear_solver, options=options, throw=False)
        return solution.value, solution.result, solution.stats
    # As lineax does, the solver is set up on the operator without its derivative: the
    # derivative of the solve comes from `custom_linear_solve`, through `operator.mv`.
    dynamic, static = eqx.partition(operator, eqx.is_array)
    state = linear_solver.init(eqx.combine(jax.lax.stop_gradient(dynamic), static), options)
    static_stats = []  # non-array statistics (`max_steps`) cannot leave a traced solve

    def run(state, options, b):
        value, result, stats = linear_solver.compute(state, b, options)
        dynamic, static = eqx.partition(stats, eqx.is_array)
        static_stats.append(static)
        return value, (result, dynamic)

    def transpose_solve(_, b):
        transposed_state, transposed_options = linear_solver.transpose(state, options)
        return run(transposed_state, transposed_options, b)

    symmetric = lx.is_symmetric(operator)
    value, (result, stats) = jax.lax.custom_linear_solve(
        operator.mv,
        vector,
        lambda _, b: run(state, options, b),
        None if symmetric else transpose_solve,
        symmetric=symmetric,
        has_aux=True,
    )
    return value, result, eqx.combine(stats, static_stats[0])


def general_solver(linear_solver: lx.AbstractLinearSolver) -> lx.AbstractLinearSolver:
    """The solver for a non-symmetric Jacobian: CG and Cholesky need a symmetric positive
    definite operator, so they run on the normal equations (jaxopt's `solve_normal_cg`)."""
    from ._linear_solver import CG

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
    value, result, stats = _solve(operator, vector, linear_solver, options)
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
    - `throw`: the failure policy of [`linear_solve`][].
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
    rhs = jax.tree.map(jnp.negative, mixed)
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
    through [`implicit_solution`][] computes, returned so that it can be inspected, reused as
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
