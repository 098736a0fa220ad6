import equinox as eqx
import lineax as lx
from jaxtyping import Array, Int, PyTree, Scalar

from ._custom_types import Params


def _lineax_message(item) -> str:
    return lx.RESULTS[item]


class RESULTS(lx.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
    """How a computation of bilevax ended: an inner solve ([`bilevax.Solution`][]'s `result`),
    a linear solve of the implicit function theorem, a hypergradient
    ([`bilevax.HypergradInfo`][]'s `result`) or a stochastic bilevel solver. It extends
    `lineax.RESULTS`, whose items (`max_steps_reached`, `breakdown`, `singular`, ...) say how a
    linear solve ended, as optimistix's does. Compare with `==`, e.g.
    `sol.result == bx.RESULTS.successful`; a linear solve's `lx.RESULTS` becomes one of these
    with `bx.RESULTS.promote(result)`."""

    # lineax's items that bilevax sets itself, restated (with lineax's own messages) so that
    # type checkers see them as items of this class.
    successful = ""
    max_steps_reached = _lineax_message(lx.RESULTS.max_steps_reached)
    nonfinite_input = _lineax_message(lx.RESULTS.nonfinite_input)
    nonfinite = (
        "A loss, a gradient or a hypergradient became non-finite (NaN or inf): the data, the "
        "hyperparameters or the iterates are not finite, or a solve diverged."
    )
    not_stationary = (
        "`params_star` is not stationary: the inner gradient norm is above `tol`, so the "
        "hypergradient is that of another point. Solve the inner problem further."
    )
    not_positive_definite = (
        "The Hessian of the inner loss at `params_star` is not positive definite (a Ritz value "
        "is <= 0): `params_star` is not a strict local minimiser, and CG's answer cannot be "
        "trusted. Solve the inner problem further, or use `lx.GMRES`, "
        "`lx.Normal(lx.CG(...))` or `bx.Damped(lx.CG(...), damping)`."
    )
    degenerate_complementarity = (
        "A constraint of the constrained inner problem is weakly active (its multiplier and its "
        "value are both within `tol` of zero): it becomes active or inactive under an "
        "arbitrarily small perturbation, so the solution has no derivative there (its KKT "
        "Jacobian is singular). The solution itself is not at fault; its derivative is NaN, "
        "or this error is raised."
    )
    kkt_infeasible = (
        "The point is not a KKT point of the constrained inner problem: a multiplier of an "
        "inequality constraint is negative (μᵢ < -tol) or the constraint is violated "
        "(gᵢ(x) > tol), so the implicit function theorem gives no derivative there. Solve the "
        "problem further, or check the signs (bilevax imposes g(x) <= 0 with μ >= 0)."
    )
    primal_infeasible = (
        "The quadratic program is primal infeasible: its constraints have no common point "
        "(the solver found a certificate). Its solution is NaN."
    )
    dual_infeasible = (
        "The quadratic program is dual infeasible: its objective is unbounded below on the "
        "feasible set (the solver found a certificate). Its solution is NaN."
    )


def promote_linear_result(result: lx.RESULTS) -> RESULTS:
    """`RESULTS.promote(result)`, item by item.

    equinox's `promote` looks the code up in a table: a gather, which a batch of codes sharded
    over an explicit mesh refuses ("out sharding could not be resolved"), and which inside a
    `shard_map` is dispatched eagerly and fails. `RESULTS` has every item of `lineax.RESULTS`
    under the same name, and a `where` per item is elementwise: the codes keep their sharding."""
    promoted = RESULTS.successful
    # equinox lists an enumeration's items only in this mapping.
    for name, item in lx.RESULTS._name_to_item.items():  # pyright: ignore[reportAttributeAccessIssue]
        promoted = RESULTS.where(result == item, getattr(RESULTS, name), promoted)
    return promoted


class Solution(eqx.Module):
    """The result of [`bilevax.inner_solve`][].

    **Attributes:**

    - `params`: the approximate minimiser of the inner loss, with the structure of `init`.
    - `result`: a [`bilevax.RESULTS`][]: `successful`, `max_steps_reached` (stopped at
        `max_steps` before the gradient norm fell to `tol`) or `nonfinite`.
    - `stats`: a dict with `"num_steps"` (steps taken) and `"grad_norm"` (the final
        $\\|\\nabla_w L\\|_2$).
    - `state`: the arrays of the solver's final state (a pytree that `lax.scan` can carry),
        not differentiated: pass it as `inner_solve(..., solver_state=...)` to resume the
        solver in the next outer step. `None` when the solution was built without one.
    """

    params: Params
    result: RESULTS
    stats: dict[str, Array]
    state: PyTree[Array] | None = None


class HypergradInfo(eqx.Module):
    r"""What [`bilevax.implicit_hypergrad`][] reports with `has_aux=True`: how the hypergradient
    was computed, from quantities it had at hand (one more gradient and one more
    Hessian-vector product). The Lanczos estimates and the error estimate and bound are
    [`bilevax.diagnostics.hypergrad_info`][], a function of this info.

    **Attributes:**

    - `result`: a [`bilevax.RESULTS`][], in order of precedence: `nonfinite` (the
        hypergradient, the adjoint or the outer loss is not finite), the linear solve's
        failure (`max_steps_reached`, `breakdown`, `singular`, ...), `not_stationary`
        ($\|\nabla_w L\|_2 >$ `tol`), `successful`.
    - `inner_grad_norm`: $\|\nabla_w L(w, \lambda)\|_2$ at `params_star`.
    - `residual_norm`: $\|H v - \nabla_w E\|_2$, the linear solve's residual.
    - `solve_steps`: the linear solver's iterations (0 for a direct solver).
    - `adjoint`: the solution $v$ of $H v = \nabla_w E$, to pass back as `adjoint_init` at the
        next outer step (a warm start).
    """

    result: RESULTS
    inner_grad_norm: Scalar
    residual_norm: Scalar
    solve_steps: Int[Array, ""]
    adjoint: PyTree[Array]
