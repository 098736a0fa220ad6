"""Linear operators and solves that keep the shardings of their vectors: under an `Auto` or
`Explicit` mesh, and inside `shard_map`. Workarounds for what lineax and equinox drop (lineax
issue #185); outside a mesh they are `lx.FunctionLinearOperator` and `lx.linear_solve`."""

from typing import Any

import equinox as eqx
import jax
import lineax as lx
from jaxtyping import Array, PyTree


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


def linear_operator(jvp, params: PyTree[Array], *, tags) -> lx.AbstractLinearOperator:
    """The linear map `jvp` (from `jax.linearize` at `params`) as a `lineax` operator whose
    input structure is that of `params`, sharding included; inside a `shard_map` that checks
    varying axes, wrapped so that it accepts the tangents lineax has typed as invariant (see
    `_VaryingJVP`)."""
    structure = jax.tree.map(_structure, params)
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


def sharded_linear_solve(
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
