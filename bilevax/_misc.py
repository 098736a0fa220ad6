import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar


def stop_gradient(tree: PyTree) -> PyTree:
    """`lax.stop_gradient` on every array leaf of a pytree that may hold non-arrays."""
    dynamic, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.lax.stop_gradient(dynamic), static)


def tree_norm(tree: PyTree[Array]) -> Scalar:
    """The 2-norm of all the leaves of a pytree together."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(0.0)
    return jnp.sqrt(sum(jnp.sum(jnp.abs(x) ** 2) for x in leaves))


def tree_isfinite(tree: PyTree[Array]) -> Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))
