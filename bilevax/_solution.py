import equinox as eqx
from jaxtyping import Array, PyTree

from ._custom_types import Params


class RESULTS(eqx.Enumeration):
    """How an inner solve ended; compare with `==`, e.g. `sol.result == bx.RESULTS.successful`."""

    successful = ""
    max_steps_reached = (
        "The inner solve reached `max_steps` before the gradient norm fell to `tol`. Raise "
        "`max_steps`, loosen `tol`, or pick a better `solver`."
    )
    nonfinite = (
        "The inner loss or its gradient became non-finite (NaN or inf) during the inner solve."
    )


class Solution(eqx.Module):
    """The result of [`bilevax.inner_solve`][].

    **Attributes:**

    - `params`: the approximate minimiser of the inner loss, with the structure of `init`.
    - `result`: a [`bilevax.RESULTS`][] saying whether the solve converged.
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
