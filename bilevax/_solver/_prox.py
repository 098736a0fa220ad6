r"""Proximal operators of the regularisers jaxopt users need most, with jaxopt's signature
`prox(x, hyperparams, scaling)`:
$\operatorname{prox}_{s g}(x) = \arg\min_y \tfrac12\|y - x\|^2 + s\, g(y)$.

Projections (non-negativity, box, simplex, L1 and L2 balls) are not written again here:
`optax.projections` keeps them; see [`bilevax.ProjectedGradient`][].
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree

from .._checks import check_real


def _leafwise(fn, x, hyperparams, name: str):
    """Applies `fn(leaf, h)` with `h` a scalar shared by all leaves or a matching pytree of
    strengths, each >= 0: a negative strength would expand where the operator shrinks. A
    concrete one is refused; a traced one (a hyperparameter being learned) makes its leaf NaN."""
    if jax.tree.structure(hyperparams) == jax.tree.structure(x):
        return jax.tree.map(lambda leaf, h: _checked(fn, leaf, h, name), x, hyperparams)
    if isinstance(hyperparams, int | float) or eqx.is_array(hyperparams):
        return jax.tree.map(lambda leaf: _checked(fn, leaf, hyperparams, name), x)
    raise ValueError(
        f"`{name}` must be a scalar or a pytree with the structure of `x`: got "
        f"{jax.tree.structure(hyperparams)}, expected {jax.tree.structure(x)}."
    )


def _checked(fn, leaf, strength, name: str):
    check_real(name, strength, lower=0, scalar=False)
    out = fn(leaf, strength)
    invalid = ~jnp.all(jnp.asarray(strength) >= 0)
    return out + jnp.where(invalid, jnp.asarray(jnp.nan, out.dtype), jnp.zeros((), out.dtype))


def _soft_threshold(x: Array, threshold) -> Array:
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0)


def prox_lasso(
    x: PyTree[Array], l1reg: PyTree[ArrayLike] = 1.0, scaling: ArrayLike = 1.0
) -> PyTree[Array]:
    r"""Soft thresholding, the proximal operator of $g(x) = \|x\|_1$ weighted by `l1reg`:
    $\operatorname{sign}(x)\max(|x| - s\,\lambda_1, 0)$, elementwise.

    **Arguments:**

    - `x`: a pytree of arrays.
    - `l1reg`: $\lambda_1 \ge 0$, a scalar, or a pytree like `x` (one strength per entry).
    - `scaling`: the step $s$.

    **Returns:**

    A pytree like `x`.
    """
    check_real("scaling", scaling, lower=0, scalar=False)
    return _leafwise(lambda leaf, lam: _soft_threshold(leaf, lam * scaling), x, l1reg, "l1reg")


def prox_elastic_net(
    x: PyTree[Array], hyperparams: tuple[ArrayLike, ArrayLike] = (1.0, 1.0), scaling=1.0
) -> PyTree[Array]:
    r"""The proximal operator of the elastic net
    $g(x) = \lambda_1 \|x\|_1 + \tfrac{\lambda_2}{2}\|x\|_2^2$:
    $\operatorname{sign}(x)\max(|x| - s\lambda_1, 0) / (1 + s\lambda_2)$.

    **Arguments:**

    - `x`: a pytree of arrays.
    - `hyperparams`: `(l1reg, l2reg)`, each a scalar or a pytree like `x`.
    - `scaling`: the step $s$.

    **Returns:**

    A pytree like `x`.
    """
    if not (isinstance(hyperparams, tuple | list) and len(hyperparams) == 2):
        raise TypeError(f"`hyperparams` must be a pair `(l1reg, l2reg)`, got {hyperparams!r}.")
    l1reg, l2reg = hyperparams
    shrunk = prox_lasso(x, l1reg, scaling)
    return _leafwise(lambda leaf, lam: leaf / (1 + lam * scaling), shrunk, l2reg, "l2reg")


def prox_group_lasso(
    x: PyTree[Array], l2reg: PyTree[ArrayLike] = 1.0, scaling: ArrayLike = 1.0
) -> PyTree[Array]:
    r"""Block soft thresholding, the proximal operator of the group lasso
    $g(x) = \lambda \sum_G \|x_G\|_2$ with one group per leaf of `x`:
    $x_G \max(1 - s\lambda / \|x_G\|_2, 0)$.

    **Arguments:**

    - `x`: a pytree of arrays; each leaf is one group.
    - `l2reg`: $\lambda \ge 0$, a scalar, or a pytree like `x` (one strength per group).
    - `scaling`: the step $s$.

    **Returns:**

    A pytree like `x`.
    """

    def block(leaf, lam):
        sqnorm = jnp.sum(leaf**2)
        # The double `where` keeps the derivative finite at a zero group.
        safe = jnp.where(sqnorm > 0, sqnorm, 1)
        factor = jnp.maximum(1 - lam * scaling / jnp.sqrt(safe), 0)
        return jnp.where(sqnorm > 0, factor, 0) * leaf

    check_real("scaling", scaling, lower=0, scalar=False)
    return _leafwise(block, x, l2reg, "l2reg")
