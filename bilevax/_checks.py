"""Trace-time checks of the primitives' arguments: each error names the argument at fault."""

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import PyTree

from ._flax import check_flax_params, close_over_variables, state_update_error
from ._misc import scalars_as_arrays


def check_callable(name: str, fn) -> None:
    if not callable(fn):
        raise TypeError(f"`{name}` must be a callable, got {type(fn).__name__}.")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")


def check_real(
    name: str,
    value,
    *,
    lower: float | None = None,
    upper: float | None = None,
    lower_open: bool = False,
    upper_open: bool = False,
    scalar: bool = True,
) -> None:
    """A real number in an interval: a Python number, or a NumPy or JAX array of a real dtype
    (a scalar unless `scalar=False`). A concrete value is checked element by element (NaN is
    in no interval); a traced one, whose value is unknown at trace time, for its type and
    shape only. `None`, a bool, a string or a complex number is a `TypeError`; a value
    outside the interval a `ValueError`. Both name the argument."""
    interval = _interval(lower, upper, lower_open, upper_open)
    kind = "a real number" if scalar else "a real number or array"
    if isinstance(value, bool) or value is None or isinstance(value, str | bytes):
        raise TypeError(f"`{name}` must be {kind}{interval}, got {value!r}.")
    if isinstance(value, numbers.Real):
        array = np.asarray(float(value))
    else:
        dtype = getattr(value, "dtype", None)
        real = dtype is not None and (
            jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
        )
        if not real:
            raise TypeError(f"`{name}` must be {kind}{interval}, got {value!r}.")
        if scalar and jnp.shape(value) != ():
            raise TypeError(
                f"`{name}` must be a scalar{interval}, got an array of shape {jnp.shape(value)}."
            )
        try:
            array = np.asarray(value, dtype=np.float64)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return  # traced: its value is unknown at trace time
    inside = np.isfinite(array) | (np.isinf(array) & (upper is None) & (array > 0))
    if lower is not None:
        inside &= array > lower if lower_open else array >= lower
    if upper is not None:
        inside &= array < upper if upper_open else array <= upper
    if not np.all(inside):
        raise ValueError(f"`{name}` must be{interval or ' finite'}, got {value!r}.")


def _interval(lower, upper, lower_open, upper_open) -> str:
    if lower is not None and upper is not None:
        left, right = "(" if lower_open else "[", ")" if upper_open else "]"
        return f" in {left}{lower}, {upper}{right}"
    if lower is not None:
        return f" {'>' if lower_open else '>='} {lower}"
    if upper is not None:
        return f" {'<' if upper_open else '<='} {upper}"
    return ""


def check_nonnegative(name: str, value) -> None:
    """A real scalar >= 0 (a tolerance): see `check_real`."""
    check_real(name, value, lower=0)


def check_hparams(hparams: PyTree) -> PyTree:
    """The hyperparameters with Python floats made arrays (differentiable); refuses a pytree
    with no floating-point array, whose hypergradient would be `None`."""
    hparams = scalars_as_arrays(hparams)
    if not any(eqx.is_inexact_array(x) for x in jax.tree.leaves(hparams)):
        raise TypeError(
            "`hparams` must hold at least one floating-point array to differentiate (an "
            "integer has no gradient: pass e.g. `jnp.asarray(3.0)`); got "
            f"{_describe(hparams)}."
        )
    return hparams


def check_instance(name: str, value, cls: type | tuple[type, ...], expected: str) -> None:
    """Refuses a class (or an uncalled factory) where an instance is expected."""
    if isinstance(value, type):
        raise TypeError(
            f"`{name}` must be an instance, e.g. `{value.__name__}(...)`, not the class "
            f"{value.__name__} itself."
        )
    if not isinstance(value, cls):
        raise TypeError(f"`{name}` must be {expected}, got {type(value).__name__}.")


def check_mode(mode) -> None:
    if mode not in ("reverse", "forward"):
        raise ValueError(f'`mode` must be "reverse" or "forward", got {mode!r}.')


def split_params(params: PyTree, name: str) -> tuple[PyTree, PyTree]:
    """Splits parameters into the floating-point arrays that are optimised and the rest."""
    check_flax_params(name, params)
    float_params, static_params = eqx.partition(params, eqx.is_inexact_array)
    if not jax.tree.leaves(float_params):
        raise TypeError(
            f"`{name}` must be a pytree with at least one floating-point JAX array to optimise "
            f"(e.g. `jnp.zeros(d)`); got {_describe(params)}."
        )
    return float_params, static_params


def check_scalar_loss(name: str, loss, params, hparams, data, params_name: str) -> None:
    """Traces `loss(params, hparams, data)` once (no FLOPs) and checks it returns a float
    scalar, re-raising a failure inside it with the arguments named. Flax variables among
    the arguments are closed over, so that Flax refuses a loss that updates them."""
    args = (params, hparams, data)
    closed, others = close_over_variables(loss, args)
    try:
        out = eqx.filter_eval_shape(closed, others)
    except Exception as error:
        flax_error = state_update_error(error, name, args, (params_name, "hparams", "data"))
        if flax_error is not None:
            raise flax_error from error
        message = (
            f"calling `{name}({params_name}, hparams, data)` failed; check that `{params_name}`, "
            f"`hparams` and the data have the structure and shapes `{name}` expects. The error "
            f"was: {error}"
        )
        try:
            wrapped = type(error)(message)
        except Exception:  # an error class with other arguments (Flax's, for one)
            wrapped = TypeError(message)
        raise wrapped from error
    if not (
        isinstance(out, jax.ShapeDtypeStruct)
        and out.shape == ()
        and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        raise ValueError(
            f"`{name}` must return a real floating-point scalar, got {_describe(out)}."
        )


def check_same_structure(name: str, tree: PyTree, reference: PyTree, reference_name: str) -> None:
    """Checks that `tree` has the pytree structure, shapes and dtypes of `reference`."""
    shape = lambda t: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), t)
    if jax.tree.structure(tree) != jax.tree.structure(reference):
        raise ValueError(
            f"`{name}` must have the pytree structure of `{reference_name}`: got "
            f"{jax.tree.structure(tree)}, expected {jax.tree.structure(reference)}."
        )
    if shape(tree) != shape(reference):
        raise ValueError(
            f"`{name}` must have the shapes and dtypes of `{reference_name}`: got "
            f"{shape(tree)}, expected {shape(reference)}."
        )


def _describe(tree: PyTree) -> str:
    described = jax.tree.map(
        lambda x: f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape") else type(x).__name__, tree
    )
    return str(described)


def check_linear_solver(linear_solver) -> None:
    if isinstance(linear_solver, type):
        raise TypeError(
            "`linear_solver` must be a solver instance, e.g. "
            f"`{linear_solver.__name__}(...)`, not the class itself."
        )
    if not isinstance(linear_solver, lx.AbstractLinearSolver):
        raise TypeError(
            "`linear_solver` must be a `lineax` linear solver (e.g. `lx.CG(rtol, atol)`, "
            f"`lx.GMRES`, `lx.LU()`) or `bx.Neumann(steps, scale)`; got {linear_solver!r}."
        )
