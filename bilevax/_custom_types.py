from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, PyTree, Scalar


Params: TypeAlias = PyTree[Any]
"""The inner variables `w`: any pytree (arrays, dicts, Equinox modules)."""

HParams: TypeAlias = PyTree[Any]
"""The outer variables `λ`: any pytree (arrays, dicts, Equinox modules)."""

Data: TypeAlias = PyTree[Any]
"""A problem's data: any pytree, or `None`."""

__all__ = ["Array", "ArrayLike", "Data", "HParams", "Params", "PyTree", "Scalar"]
