r"""What bilevax checks of Flax NNX variables among a primitive's arguments.

A Flax model enters bilevax as the state `nnx.split` returns: an `nnx.State`, a pytree whose
nodes are `nnx.Variable`s (`Param`, `BatchStat`, `RngKey`, `RngCount`, ...). bilevax
differentiates every floating-point leaf of `params`, so `params` must hold parameters only:
`graphdef, params, rest = nnx.split(model, nnx.Param, ...)`. And an inner or outer loss is
called again at every step and differentiated, so it must be a pure function of its
arguments: a Flax update made inside it (BatchNorm's statistics in training mode, a draw from
an `nnx.Rngs` stream by Dropout) would be lost, every call seeing the same statistics or the
same random mask.

Neither can be seen from the leaves alone (batch statistics are floating-point arrays like
parameters), so the checks here read the variables' types. bilevax never imports Flax: a
Flax variable can only exist once the user has imported `flax.nnx`, and until then every
function here returns at once.
"""

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jaxtyping import PyTree


def _nnx() -> Any:
    return sys.modules.get("flax.nnx")


def _is_variable(x) -> bool:
    nnx = _nnx()
    return nnx is not None and isinstance(x, nnx.Variable)


def _variables(tree: PyTree, prefix: str) -> list[tuple[str, Any]]:
    """`(path, variable)` for every NNX variable in `tree`, paths written from `prefix`."""
    if _nnx() is None:
        return []
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]
    return [(prefix + jax.tree_util.keystr(p), x) for p, x in leaves if _is_variable(x)]


def check_flax_params(name: str, params: PyTree) -> None:
    """Refuses Flax variables that are not parameters in the pytree bilevax optimises, and
    an NNX module in place of its state.

    Batch statistics are floating-point and would be optimised as weights; RNG keys and
    counts would be left as they are, so that a Dropout inside the loss drew the same mask
    at every step. Both are refused, naming the leaves."""
    nnx = _nnx()
    if nnx is None:
        return
    is_module = lambda x: isinstance(x, nnx.Module)
    modules = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_module)[0]
    modules = [name + jax.tree_util.keystr(p) for p, x in modules if is_module(x)]
    if modules:
        # A module is a pytree in recent Flax, but its gradients do not keep its structure
        # (the implicit adjoint's linear solve would fail on them, saying nothing of Flax).
        raise TypeError(
            f"`{name}` holds a Flax NNX module (`{modules[0]}`); pass its state instead: "
            "`graphdef, params, rest = nnx.split(model, nnx.Param, ...)`, `params` to bilevax, "
            "and `nnx.merge(graphdef, params, rest)` inside the loss."
        )
    others = [(path, x) for path, x in _variables(params, name) if not isinstance(x, nnx.Param)]
    if others:
        listed = ", ".join(f"`{path}` ({type(x).__name__})" for path, x in others[:6])
        more = f" and {len(others) - 6} more" if len(others) > 6 else ""
        raise TypeError(
            f"`{name}` holds Flax variables that are not parameters: {listed}{more}. bilevax "
            f"optimises every floating-point leaf of `{name}`, so it must be the parameters "
            "alone: split the model with `graphdef, params, rest = nnx.split(model, "
            "nnx.Param, ...)`, pass `params`, and give the loss `rest` (closed over, or in "
            "`data`) to rebuild the model with `nnx.merge(graphdef, params, rest)`."
        )


def close_over_variables(fn: Callable, args: tuple) -> tuple[Callable[[list], Any], list]:
    """`fn(*args)` as `(closed, others)`: `closed(others)` rebuilds `args` from the leaves
    `others` and the Flax variables of `args` themselves, closed over.

    Traced with `others` as its input, `closed` sees the user's own variables, created
    outside the trace: Flax refuses (`TraceContextError`) any update of them inside it.
    Passed as traced inputs instead they would be recreated inside the trace, where an
    update is allowed and silently lost."""
    if _nnx() is None:
        return lambda others: fn(*others), list(args)
    leaves, treedef = jax.tree.flatten(args, is_leaf=_is_variable)
    variables = {i: x for i, x in enumerate(leaves) if _is_variable(x)}
    if not variables:
        return lambda others: fn(*others), list(args)
    others = [None if i in variables else x for i, x in enumerate(leaves)]

    def closed(others: list) -> Any:
        leaves = [variables.get(i, x) for i, x in enumerate(others)]
        return fn(*jax.tree.unflatten(treedef, leaves))

    return closed, others


def state_update_error(
    error: Exception, loss_name: str, args: tuple, arg_names: Sequence[str]
) -> TypeError | None:
    """The error to raise for `error` if it is Flax refusing an update of one of its
    variables inside `loss_name`, naming the variables of that type among `args`; else
    `None`."""
    errors = sys.modules.get("flax.errors")
    if errors is None or not isinstance(error, errors.TraceContextError):
        return None
    match = re.search(r"mutate (\w+)", str(error))
    kind = match.group(1) if match else "Variable"
    paths = [
        path
        for arg, arg_name in zip(args, arg_names)
        for path, x in _variables(arg, arg_name)
        if type(x).__name__ == kind
    ]
    if paths:
        listed = ", ".join(f"`{p}`" for p in paths[:6])
        where = f"the `{kind}` leaves among its arguments are {listed}"
    else:
        where = "it closes over them, e.g. the `rest` of `nnx.split`"
    return TypeError(
        f"`{loss_name}` updates a Flax `{kind}` variable ({where}). A loss must be a pure "
        f"function of its arguments: bilevax calls it again at every step and "
        "differentiates it, so an update made inside it (BatchNorm's statistics in training "
        "mode, a draw from an `nnx.Rngs` stream by Dropout) would be lost, and every call "
        "would see the same statistics or the same random mask. Run the model in evaluation "
        "mode inside the loss (`model.eval()`, or `use_running_average=True` and "
        "`deterministic=True`); for randomness, pass a key in `data` and draw from it (e.g. "
        "`nnx.Dropout(...)(x, rngs=nnx.Rngs(dropout=key))`)."
    )
