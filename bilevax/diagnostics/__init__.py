"""Diagnostics of a hypergradient: pure functions of the problem and the adjoint, built on the
same Hessian operator and linear solve as [`bilevax.implicit_hypergrad`][]."""

from ._info import (
    HypergradInfo as HypergradInfo,
    HypergradResult as HypergradResult,
    hypergrad_info as hypergrad_info,
)
