r"""HOAG (Pedregosa 2016): a hypergradient oracle whose inner and linear-solve tolerances
tighten from one outer step to the next, with both solves warm-started from the previous one.
The outer step is the user's: any `optax.GradientTransformation` applied to its hypergradient."""

from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Int, PyTree, Scalar

from .._adjoint import ImplicitAdjoint
from .._checks import check_bool, check_hparams, check_int, check_real
from .._custom_types import Data, HParams, Params
from .._hypergrad import adjoint_hypergrad
from .._ift import dtype_floor
from .._inner_solve import inner_solve
from .._linear_solver import CG, Preconditioned, QuasiNewtonPreconditioner
from .._solver import (
    AbstractInnerSolver,
    GradientDescent,
    SolverLike,
    as_inner_solver,
    check_solver,
)


class HOAGState(eqx.Module):
    """What [`bilevax.contrib.HOAG`][] carries from one outer step to the next, explicitly.

    **Attributes:**

    - `params`: the last inner solution, the next inner solve's starting point (`init`
        throughout with `warm_start_params=False`).
    - `adjoint`: the last adjoint $v = H^{-1}\\nabla_w E$, the next linear solve's starting
        point (zero throughout with `warm_start_adjoint=False`).
    - `step`: the number of hypergradients computed, which sets the tolerance $\\epsilon_k$.
    - `solver_state`: the last inner solve's solver state ([`bilevax.Solution`][]'s `state`),
        which the next inner solve resumes: a quasi-Newton minimiser's Hessian approximation.
        `None` when there is nothing to resume (`resume_solver_state=False`, or a solver that
        keeps nothing between solves, such as [`bilevax.GradientDescent`][] or optax's).
    """

    params: Params
    adjoint: PyTree[Array]
    step: Int[Array, ""]
    solver_state: PyTree[Array] | None = None


class HOAG(eqx.Module):
    r"""The hypergradient oracle of HOAG (Pedregosa 2016): hypergradients whose accuracy grows
    from one outer step to the next, for any `optax` optimiser to follow.

    Call $k$ solves the inner problem to $\|\nabla_w L\| \le \epsilon_k$ and the adjoint
    system $Hv = \nabla_w E$ to $\|Hv - \nabla_w E\| \le \epsilon_k
    \max(1, \|\nabla_w E\|)$, with

    $$\epsilon_k = \max(\epsilon_0 \,\rho^k, \epsilon_{\min}),$$

    so early steps, far from the optimum, are cheap, and the hypergradient error (which is
    $O(\epsilon_k)$, see [`bilevax.diagnostics.hypergrad_info`][]) shrinks as the steps do;
    Pedregosa shows the iterates converge when $\sum_k \epsilon_k < \infty$. `decay=1` gives
    the usual fixed-tolerance loop. Each call starts the inner solver at the previous inner
    solution, resuming its state (a quasi-Newton minimiser's Hessian approximation, see
    [`bilevax.inner_solve`][]'s `solver_state`), and [`bilevax.CG`][] at the previous
    adjoint, all carried in the [`bilevax.contrib.HOAGState`][]. With a dense `optx.BFGS`
    inner solver, `precondition=True` also preconditions CG with BFGS's inverse-Hessian
    approximation ([`bilevax.QuasiNewtonPreconditioner`][]).

    ```python
    hoag = bx.contrib.HOAG(optx.BFGS(rtol=1e-8, atol=1e-8), precondition=True)
    optimizer = optax.adam(0.05)

    def outer_step(carry, _):
        hparams, state, opt_state = carry
        value, hypergrad, state, stats = hoag.value_and_grad(
            outer_loss, inner_loss, hparams, state, inner_data, outer_data
        )
        updates, opt_state = optimizer.update(hypergrad, opt_state, hparams)
        return (optax.apply_updates(hparams, updates), state, opt_state), value

    carry = (hparams, hoag.init(init, hparams, inner_loss, inner_data), optimizer.init(hparams))
    carry, values = jax.lax.scan(outer_step, carry, length=100)
    ```

    **Arguments:**

    - `solver`: the inner solver (anything [`bilevax.inner_solve`][] accepts).
    - `initial_tol`, `decay`, `final_tol`: $\epsilon_0$, $\rho$ and $\epsilon_{\min}$. CG's
        tolerance is $\epsilon_k$ too, absolute as in Pedregosa (2016) and relative when
        $\|\nabla_w E\| > 1$, never below what the parameters' dtype resolves ($10^{-10}$ in
        float64, $10^{-5}$ in float32), as for [`bilevax.ImplicitAdjoint`][].
    - `max_steps`: the inner solver's step limit per call.
    - `linear_max_steps`: CG's step limit (default: ten times the number of parameters).
    - `warm_start_params`, `warm_start_adjoint`: start the inner solve (the linear solve)
        where the previous one ended, instead of at `init` (at zero).
    - `resume_solver_state`: resume the inner solver's state from the previous call
        (`inner_solve(..., solver_state=...)`). It changes nothing for solvers that keep no
        curvature (gradient descent, optax); a quasi-Newton one then needs `inner_loss` in
        `init`.
    - `precondition`: precondition CG with the inner solver's inverse-Hessian approximation
        ([`bilevax.QuasiNewtonPreconditioner`][]); the solver must keep one (`optx.BFGS`,
        `optx.LBFGS`). It pays with a dense BFGS, hardly with L-BFGS's few curvature pairs.
    - `throw`: whether a failed linear solve raises (the default), or makes the
        hypergradient NaN (an approximation for a solve cut short at its `max_steps`), with
        `"solve_result"` saying why.
    """

    solver: SolverLike = GradientDescent(0.1)
    initial_tol: float = 1e-2
    decay: float = 0.9
    final_tol: float = 1e-10
    max_steps: int = eqx.field(static=True, default=10_000)
    linear_max_steps: int | None = eqx.field(static=True, default=None)
    warm_start_params: bool = eqx.field(static=True, default=True)
    warm_start_adjoint: bool = eqx.field(static=True, default=True)
    resume_solver_state: bool = eqx.field(static=True, default=True)
    precondition: bool = eqx.field(static=True, default=False)
    throw: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        check_solver(self.solver)
        check_int("max_steps", self.max_steps, 1)
        for name in ("warm_start_params", "warm_start_adjoint", "resume_solver_state"):
            check_bool(name, getattr(self, name))
        check_bool("precondition", self.precondition)
        check_bool("throw", self.throw)
        check_real("initial_tol", self.initial_tol, lower=0, lower_open=True)
        check_real("final_tol", self.final_tol, lower=0, lower_open=True)
        # ρ > 1 would loosen the tolerances as the loop goes.
        check_real("decay", self.decay, lower=0, upper=1, lower_open=True)
        if self.linear_max_steps is not None:
            check_int("linear_max_steps", self.linear_max_steps, 1)

    def tolerance(self, step: Int[Array, ""]) -> Scalar:
        """$\\epsilon_k$ at call `step`."""
        return jnp.maximum(self.initial_tol * self.decay**step, self.final_tol)

    def init(
        self, init: Params, hparams: HParams, inner_loss=None, inner_data: Data = None
    ) -> HOAGState:
        """The state before the first call, from the inner solver's starting point.

        **Arguments:**

        - `init`: the inner solver's starting point.
        - `hparams`: the initial hyperparameters.
        - `inner_loss`, `inner_data`: the inner loss and its data, as `value_and_grad` gets
            them: they build the inner solver's first state (`inner_solve(..., max_steps=0)
            .state`, no step taken) when the solver has one to resume; needed then, and
            unused otherwise.

        **Returns:**

        A [`bilevax.contrib.HOAGState`][].
        """
        hparams = check_hparams(hparams)
        float_init = eqx.filter(init, eqx.is_inexact_array)
        solver_state = None
        if self.resume_solver_state and _resumes(as_inner_solver(self.solver, hparams)):
            if inner_loss is None:
                raise ValueError(
                    "`HOAG.init` needs `inner_loss` (and `inner_data`) to build the state of "
                    "the inner solver, which `resume_solver_state=True` carries from one outer "
                    "step to the next; pass them, or set `resume_solver_state=False`."
                )
            solver_state = inner_solve(
                inner_loss, init, hparams, inner_data, solver=self.solver, max_steps=0
            ).state
        return HOAGState(
            params=init,
            adjoint=jax.tree.map(jnp.zeros_like, float_init),
            step=jnp.asarray(0),
            solver_state=solver_state,
        )

    def value_and_grad(
        self,
        outer_loss,
        inner_loss,
        hparams: HParams,
        state: HOAGState,
        inner_data: Data = None,
        outer_data: Data = None,
    ) -> tuple[Array, PyTree[Array], HOAGState, dict[str, Any]]:
        """The outer loss and its hypergradient at `hparams`, to the tolerance of this call.

        **Arguments:**

        - `outer_loss`, `inner_loss`: as for [`bilevax.implicit_hypergrad`][].
        - `hparams`: the hyperparameters (any pytree; the hypergradient has its structure,
            `None` at non-floating-point leaves, ready for `optimizer.update`).
        - `state`: from `init` or the previous call.
        - `inner_data`, `outer_data`: the data for the two losses.

        **Returns:**

        `(value, hypergrad, state, stats)`: the outer loss and its hypergradient, the new
        state, and a dict with the `"tol"` used, the `"inner_steps"` and `"solve_steps"`
        taken, the inner `"grad_norm"`, and how the two solves ended (`"inner_result"` and
        `"solve_result"`, both [`bilevax.RESULTS`][]).
        """
        hparams = check_hparams(hparams)
        inner_solver = as_inner_solver(self.solver, hparams)
        if self.precondition:
            _check_inverse_hessian(inner_solver, inner_loss, state.params, hparams, inner_data)
        # Traced tolerances are fine for both solvers; their annotations say float.
        tol = cast(Any, self.tolerance(state.step))
        sol = inner_solve(
            inner_loss,
            state.params,
            hparams,
            inner_data,
            solver=inner_solver,
            max_steps=self.max_steps,
            tol=tol,
            adjoint=ImplicitAdjoint(),
            solver_state=state.solver_state if self.resume_solver_state else None,
        )
        # Pedregosa's ε_k bounds the residual absolutely, as it bounds the inner gradient:
        # ‖Hv − ∇_w E‖ ≤ ε_k max(1, ‖∇_w E‖), never below what the dtype resolves. (A relative
        # rule alone is stricter for ‖∇_w E‖ < 1, at no gain in accuracy: the inner solution
        # is only ε_k-accurate.)
        epsilon = jnp.maximum(tol, dtype_floor(state.adjoint))
        linear_solver: lx.AbstractLinearSolver = CG(
            rtol=epsilon, atol=epsilon, max_steps=self.linear_max_steps
        )
        if self.precondition:
            preconditioner = QuasiNewtonPreconditioner(inner_solver, sol.state)
            linear_solver = Preconditioned(linear_solver, preconditioner)
        value, hypergrad, info = adjoint_hypergrad(
            outer_loss,
            inner_loss,
            sol.params,
            hparams,
            (inner_data, outer_data),
            linear_solver,
            throw=self.throw,
            adjoint_init=state.adjoint,
        )
        new_state = HOAGState(
            params=sol.params if self.warm_start_params else state.params,
            adjoint=info.adjoint if self.warm_start_adjoint else state.adjoint,
            step=state.step + 1,
            # The carry keeps `init`'s structure: a state only where there was one.
            solver_state=None if state.solver_state is None else sol.state,
        )
        stats = {
            "tol": tol,
            "inner_steps": sol.stats["num_steps"],
            "solve_steps": info.solve_steps,
            "grad_norm": sol.stats["grad_norm"],
            "inner_result": sol.result,
            "solve_result": info.result,
        }
        return value, hypergrad, new_state, stats


def _resumes(solver: AbstractInnerSolver) -> bool:
    """Whether `solver` keeps anything of an earlier solve's state: the default `resume`
    starts afresh (gradient descent, optax)."""
    return type(solver).resume is not AbstractInnerSolver.resume


def _check_inverse_hessian(
    solver: AbstractInnerSolver, inner_loss, init: Params, hparams: HParams, data: Data
) -> None:
    """Raises unless `solver`'s state holds an inverse-Hessian approximation (for
    `precondition=True`); shapes only, nothing is computed."""
    float_init, static_init = eqx.partition(init, eqx.is_inexact_array)
    loss = lambda params, args: inner_loss(eqx.combine(params, static_init), *args)
    state = eqx.filter_eval_shape(solver.init, loss, float_init, (hparams, data))
    if solver.inverse_hessian(state) is None:
        raise ValueError(
            "`precondition=True` needs an inner solver that approximates the inverse Hessian, "
            "an `optimistix` quasi-Newton minimiser such as `optx.BFGS` or `optx.LBFGS` (with "
            f"`use_inverse=True`); got {solver!r}."
        )
