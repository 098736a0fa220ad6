from collections.abc import Callable
from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, PyTree, Scalar


Params: TypeAlias = PyTree[Any]
"""The inner variables `w`: any pytree (arrays, dicts, Equinox modules)."""

HParams: TypeAlias = PyTree[Any]
"""The outer variables `λ`: any pytree (arrays, dicts, Equinox modules)."""

Data: TypeAlias = PyTree[Any]
"""A problem's data: any pytree, or `None`."""

InnerLoss: TypeAlias = Callable[[Params, HParams, Data], Scalar]
"""The training objective $L$: `inner_loss(params, hparams, data) -> scalar`."""

OuterLoss: TypeAlias = Callable[[Params, HParams, Data], Scalar]
"""The validation objective $E$: `outer_loss(params, hparams, data) -> scalar`."""

__all__ = [
    "Array",
    "ArrayLike",
    "Data",
    "HParams",
    "InnerLoss",
    "OuterLoss",
    "Params",
    "PyTree",
    "Scalar",
]
