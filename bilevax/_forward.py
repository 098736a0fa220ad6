import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import PyTree, Scalar


# Directions pushed forward at once: all of them for a few hyperparameters (one vmapped
# JVP), bounded chunks for many, so memory stays at `_CHUNK` tangents rather than `n`.
_CHUNK = 128


def forward_value_and_grad(fn, hparams: PyTree) -> tuple[Scalar, PyTree]:
    """`eqx.filter_value_and_grad(fn)(hparams)` computed in forward mode: one JVP per scalar
    hyperparameter, in vmapped chunks, so memory does not grow with the length of any loop
    inside `fn` (forward-mode propagation of $dw_t/d\\lambda$, Franceschi et al. 2017).
    """
    float_hparams, static_hparams = eqx.partition(hparams, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(float_hparams)
    flat_fn = lambda x: fn(eqx.combine(unravel(x), static_hparams))
    if flat.size == 0:
        return flat_fn(flat), unravel(flat)

    def along(index):
        direction = jnp.zeros_like(flat).at[index].set(1)
        return jax.jvp(flat_fn, (flat,), (direction,))

    indices = jnp.arange(flat.size)
    values, derivatives = jax.lax.map(along, indices, batch_size=min(flat.size, _CHUNK))
    return values[0], unravel(derivatives)
