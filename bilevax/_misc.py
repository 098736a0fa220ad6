import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar


def stop_gradient(tree: PyTree) -> PyTree:
    """`lax.stop_gradient` on every array leaf of a pytree that may hold non-arrays.

    Arrays stay arrays: on a tracer of a Python float (`jax.grad(f)(0.3)`) newer JAX returns
    a literal that Equinox's filters would take for a static leaf."""
    dynamic, static = eqx.partition(tree, eqx.is_array)
    dynamic = jax.tree.map(lambda x: jnp.asarray(jax.lax.stop_gradient(x)), dynamic)
    return eqx.combine(dynamic, static)


def tree_norm(tree: PyTree[Array]) -> Scalar:
    """The 2-norm of all the leaves of a pytree together."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(0.0)
    return jnp.sqrt(sum(jnp.sum(jnp.abs(x) ** 2) for x in leaves))


def tree_isfinite(tree: PyTree[Array]) -> Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))


def tree_where_nan(pred, tree: PyTree[Array]) -> PyTree[Array]:
    """`tree` with every floating-point leaf replaced by NaN where `pred` holds.

    Written as `x + (NaN or 0)`, not `where(pred, NaN, x)`, so that a cotangent still flows to
    `x` (a `where` would send it zero, and a derivative through a failed value would come out
    finite)."""

    def leaf(x):
        if not eqx.is_inexact_array(x):
            return x
        return x + jnp.where(pred, jnp.asarray(jnp.nan, x.dtype), jnp.zeros((), x.dtype))

    return jax.tree.map(leaf, tree)


def tree_subtract(a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    """`a - b` leaf by leaf (`None` leaves, as `eqx.filter_grad` leaves them, stay `None`)."""
    return jax.tree.map(jnp.subtract, a, b)


def scalars_as_arrays(tree: PyTree) -> PyTree:
    """`tree` with its Python floats and floating-point scalars copied into fresh arrays.

    A Python float is differentiable (`jax.grad(f)(0.3)` makes it the primal of a tracer), but
    newer JAX hands such a primal to a custom JVP, or out of `lax.stop_gradient`, as a
    literal that Equinox's filters take for a static leaf: its derivative would be lost, or
    a closure-converted loss refuse it. A copy (`jnp.array`) is a real array."""

    def leaf(x):
        if isinstance(x, bool):
            return x
        if isinstance(x, float | complex) or (eqx.is_inexact_array(x) and x.ndim == 0):
            return jnp.array(x)
        return x

    return jax.tree.map(leaf, tree)
