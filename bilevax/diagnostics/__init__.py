"""Diagnostics of a hypergradient: pure functions of the problem and the
[`bilevax.HypergradInfo`][] of [`bilevax.implicit_hypergrad`][], built on the same Hessian
operator, linear solve and statement of the hypergradient."""

from ._info import (
    HypergradDiagnostics as HypergradDiagnostics,
    HypergradResult as HypergradResult,
    hypergrad_info as hypergrad_info,
)
