import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import PyTree, Scalar


def forward_value_and_grad(fn, hparams: PyTree) -> tuple[Scalar, PyTree]:
    """`eqx.filter_value_and_grad(fn)(hparams)` computed in forward mode: one JVP per scalar
    hyperparameter, batched with `vmap`, so memory does not grow with the length of any
    loop inside `fn` (forward-mode propagation of $dw_t/d\\lambda$, Franceschi et al. 2017).
    """
    float_hparams, static_hparams = eqx.partition(hparams, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(float_hparams)
    flat_fn = lambda x: fn(eqx.combine(unravel(x), static_hparams))
    if flat.size == 0:
        return flat_fn(flat), unravel(flat)
    directions = jnp.eye(flat.size, dtype=flat.dtype)
    values, derivatives = jax.vmap(lambda t: jax.jvp(flat_fn, (flat,), (t,)))(directions)
    return values[0], unravel(derivatives)
