"""Extreme eigenvalues of a symmetric operator from a few matrix-vector products (Lanczos)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def ritz_values(
    matvec: Callable[[Float[Array, " n"]], Float[Array, " n"]],
    size: int,
    steps: int,
    dtype,
    key: Array,
) -> Float[Array, " k"]:
    r"""The Ritz values of a symmetric operator on a Krylov subspace of dimension
    $k = \min(\text{steps}, n)$: the eigenvalues of $Q^\top A Q$ for an orthonormal basis $Q$
    built by Lanczos with full re-orthogonalisation.

    Each Ritz value lies in $[\lambda_{\min}(A), \lambda_{\max}(A)]$, whatever the subspace,
    and the extreme ones converge to the extreme eigenvalues quickly; with $k = n$ they are
    the eigenvalues. When the Krylov subspace closes early (an invariant subspace), the basis
    is continued with a random vector, so the values stay inside the spectrum. Uses $k$
    products with $A$.
    """
    k = min(steps, size)
    keys = jax.random.split(key, k + 1)
    start = jax.random.normal(keys[0], (size,), dtype)
    basis = jnp.zeros((size, k), dtype).at[:, 0].set(start / jnp.linalg.norm(start))
    images = jnp.zeros((size, k), dtype)

    def orthonormalise(vector, basis, j):
        # Twice is enough (Kahan): classical Gram-Schmidt against the columns filled so far.
        mask = (jnp.arange(k) <= j).astype(dtype)
        for _ in range(2):
            vector = vector - basis @ (mask * (basis.T @ vector))
        return vector, jnp.linalg.norm(vector)

    def body(j, carry):
        basis, images = carry
        image = matvec(basis[:, j])
        images = images.at[:, j].set(image)
        new, norm = orthonormalise(image, basis, j)
        fresh, fresh_norm = orthonormalise(jax.random.normal(keys[j + 1], (size,), dtype), basis, j)
        scale = jnp.linalg.norm(image) + jnp.finfo(dtype).tiny
        closed = norm <= 1e3 * jnp.finfo(dtype).eps * scale
        new = jnp.where(closed, fresh / fresh_norm, new / jnp.where(closed, 1.0, norm))
        basis = jnp.where(j + 1 < k, basis.at[:, jnp.minimum(j + 1, k - 1)].set(new), basis)
        return basis, images

    basis, images = jax.lax.fori_loop(0, k, body, (basis, images))
    projected = basis.T @ images
    return jnp.linalg.eigvalsh((projected + projected.T) / 2)
