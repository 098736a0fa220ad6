"""`skip_zero_products`: Δ-STN's programs without the products that zeros by construction
decide. It lives beside its only caller: the core's `linearized_response` needs none of it."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Literal, primitives as prims


class _Zero:
    """A value known to be exactly zero, of abstract value `aval`; never materialised unless
    an operation needs it as an array."""

    def __init__(self, aval):
        self.aval = aval


def _is_zero(value) -> bool:
    return isinstance(value, _Zero)


def _materialise(value):
    return lax.full(value.aval.shape, 0, value.aval.dtype) if _is_zero(value) else value


# Zero when either of the first two operands is zero.
_BILINEAR = frozenset({prims.mul_p, prims.dot_general_p, prims.conv_general_dilated_p})
# Zero when the first operand is zero (linear in it; the others are shapes, indices, a divisor).
_LINEAR_IN_FIRST = frozenset(
    {
        prims.neg_p,
        prims.broadcast_in_dim_p,
        prims.reshape_p,
        prims.transpose_p,
        prims.squeeze_p,
        prims.convert_element_type_p,
        prims.copy_p,
        prims.reduce_sum_p,
        prims.reduce_window_sum_p,
        prims.slice_p,
        prims.rev_p,
        prims.cumsum_p,
        prims.reduce_precision_p,
        prims.dynamic_slice_p,
        prims.div_p,
        prims.select_and_scatter_add_p,
    }
)
_SUMS = frozenset({prims.add_p, prims.add_jaxvals_p})


def _is_zero_literal(atom) -> bool:
    return (
        isinstance(atom, Literal)
        and jnp.issubdtype(jnp.result_type(atom.val), jnp.inexact)
        and np.ndim(atom.val) == 0
        and atom.val == 0
    )


def _same_type(value, aval) -> bool:
    return jnp.shape(value) == aval.shape and jnp.result_type(value) == aval.dtype


def _fold(eqn, inputs) -> list | None:
    """The outputs of `eqn` if known zeros among `inputs` decide them without computing;
    `None` otherwise."""
    prim, (out, *_) = eqn.primitive, eqn.outvars
    zeros = lambda: [_Zero(v.aval) for v in eqn.outvars]
    if prim is prims.broadcast_in_dim_p and _is_zero_literal(eqn.invars[0]):
        return zeros()
    if prim in _BILINEAR and (_is_zero(inputs[0]) or _is_zero(inputs[1])):
        return zeros()
    if prim in _LINEAR_IN_FIRST and _is_zero(inputs[0]):
        return zeros()
    if prim in _SUMS or prim is prims.sub_p:
        a, b = inputs
        if _is_zero(a) and _is_zero(b):
            return zeros()
        if _is_zero(b) and _same_type(a, out.aval):
            return [a]
        if _is_zero(a) and _same_type(b, out.aval):
            return [b if prim in _SUMS else lax.neg(b)]
    if prim is prims.select_n_p and all(map(_is_zero, inputs[1:])):
        return zeros()
    if prim is prims.concatenate_p and all(map(_is_zero, inputs)):
        return zeros()
    if prim is prims.jit_p:
        closed = eqn.params["jaxpr"]
        return _eval_skipping_zeros(closed.jaxpr, closed.consts, inputs)
    return None


def _eval_skipping_zeros(jaxpr, consts, args) -> list:
    env = {}
    read = lambda atom: atom.val if isinstance(atom, Literal) else env[atom]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        inputs = [read(atom) for atom in eqn.invars]
        outputs = _fold(eqn, inputs)
        if outputs is None:
            params = eqn.primitive.get_bind_params(eqn.params)
            # Before JAX 0.8 this was `(subfuns, params)`.
            subfuns, params = params if isinstance(params, tuple) else ((), params)
            outputs = eqn.primitive.bind(*subfuns, *map(_materialise, inputs), **params)
            if not eqn.primitive.multiple_results:
                outputs = [outputs]
        env.update(zip(eqn.outvars, outputs))
    return [read(atom) for atom in jaxpr.outvars]


def skip_zero_products(fn: Callable) -> Callable:
    r"""`fn`, skipping every operation whose result is zero because an operand is a known zero.

    Traces `fn` to a jaxpr and evaluates it, following the values that are zeros by
    construction (`jnp.zeros`, and what is linear in them: a product with a zero, a transpose
    of a zero cotangent, a zero added to something) and computing no operation that produces
    one; XLA then drops what only fed those. Neither JAX nor XLA can do this: a traced zero is
    an array like any other, and XLA does not fold $0 \cdot x$ for floats, which is
    $\text{NaN}$ for an infinite $x$.

    This is what the Δ-STN weight step needs: differentiated at $h = 0$, an STN layer's
    $(H h) \odot V \dot x$ term in the tangent, the pullbacks' paths through $H h$, and those
    of the zero cotangents that seed the decoupled pullbacks are all zero, yet cost as much as
    the products that are not.

    The numbers are those of `fn` wherever they are finite: only $0 \cdot x$ and $0 / x$ are
    taken to be $0$ without looking at $x$, and $x + 0$ to be $x$. `fn` is traced anew at every
    call, so call the result inside a `jax.jit`; it works under `jax.vmap` and differentiation
    as `fn` does.

    **Arguments:**

    - `fn`: a function of pytrees of arrays, returning a pytree of arrays.

    **Returns:**

    A function with the signature of `fn`.
    """

    def skipping(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outputs = _eval_skipping_zeros(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), [_materialise(x) for x in outputs])

    return skipping
