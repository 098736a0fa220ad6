r"""HOAG (Pedregosa 2016): an outer loop whose inner and linear-solve tolerances tighten as it
goes, with both solves warm-started from the previous outer step."""

import dataclasses
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optax
from jaxtyping import Array, Int, PyTree, Scalar

from .._adjoint import ImplicitAdjoint
from .._checks import check_bool, check_hparams, check_instance, check_int, check_real
from .._custom_types import Data, HParams, Params
from .._implicit import adjoint_hypergrad
from .._inner_solve import inner_solve
from .._linear_solver import CG, Preconditioned, QuasiNewtonPreconditioner, default_linear_solver
from .._solver import AbstractInnerSolver, GradientDescent, SolverLike, as_inner_solver


class HOAGState(eqx.Module):
    """The state [`bilevax.contrib.HOAG`][] carries from one outer step to the next, explicitly.

    **Attributes:**

    - `hparams`: the current hyperparameters.
    - `params`: the last inner solution, the next inner solve's starting point.
    - `adjoint`: the last adjoint $v = H^{-1}\\nabla_w E$, the next linear solve's starting
        point.
    - `opt_state`: the outer optimiser's state.
    - `step`: the number of outer steps taken.
    - `solver_state`: the last inner solve's solver state ([`bilevax.Solution`][]'s `state`),
        which the next inner solve resumes: a quasi-Newton minimiser's Hessian approximation.
        `None` when there is nothing to resume (`resume_solver_state=False`, or a solver that
        keeps nothing between solves, such as [`bilevax.GradientDescent`][] or optax's).
    """

    hparams: HParams
    params: Params
    adjoint: PyTree[Array]
    opt_state: optax.OptState
    step: Int[Array, ""]
    solver_state: PyTree[Array] | None = None


class HOAG(eqx.Module):
    r"""Hypergradient descent with an adaptive tolerance schedule (HOAG, Pedregosa 2016):
    bilevax's best outer loop in one class.

    Outer step $k$ solves the inner problem to $\|\nabla_w L\| \le \epsilon_k$ and the
    adjoint system $Hv = \nabla_w E$ to $\|Hv - \nabla_w E\| \le \epsilon_k
    \max(1, \|\nabla_w E\|)$, with

    $$\epsilon_k = \max(\epsilon_0 \, \rho^k, \epsilon_{\min}),$$

    so early steps, far from the optimum, are cheap, and the hypergradient error (which is
    $O(\epsilon_k)$, see [`bilevax.diagnostics.HypergradInfo`][]) shrinks as the steps do; Pedregosa
    shows the iterates converge when $\sum_k \epsilon_k < \infty$. `decay=1` gives the usual
    fixed-tolerance loop. Each step starts the inner solver at the previous inner solution,
    resuming its state (a quasi-Newton minimiser's Hessian approximation, see
    [`bilevax.inner_solve`][]'s `solver_state`), and [`bilevax.CG`][] at the previous adjoint,
    all carried in the [`bilevax.contrib.HOAGState`][]. With a dense `optx.BFGS` inner solver,
    `precondition=True` also preconditions CG with BFGS's inverse-Hessian approximation
    ([`bilevax.QuasiNewtonPreconditioner`][]).

    ```python
    hoag = bx.contrib.HOAG(optax.adam(0.05), optx.BFGS(rtol=1e-8, atol=1e-8), precondition=True)
    state = hoag.init(init, hparams, inner_loss, inner_data)
    state, stats = jax.lax.scan(
        lambda state, _: hoag.step(outer_loss, inner_loss, state, init, inner_data, outer_data),
        state,
        length=100,
    )
    ```

    **Arguments:**

    - `optimizer`: the outer `optax.GradientTransformation` on the hyperparameters.
    - `solver`: the inner solver (anything [`bilevax.inner_solve`][] accepts).
    - `initial_tol`, `decay`, `final_tol`: $\epsilon_0$, $\rho$ and $\epsilon_{\min}$. CG's
        tolerance is $\epsilon_k$ too, absolute as in Pedregosa (2016) and relative when
        $\|\nabla_w E\| > 1$, never below what the parameters' dtype resolves ($10^{-10}$ in
        float64, $10^{-5}$ in float32), as for [`bilevax.ImplicitAdjoint`][].
    - `max_steps`: the inner solver's step limit per outer step.
    - `linear_max_steps`: CG's step limit (default: ten times the number of parameters).
    - `warm_start_params`, `warm_start_adjoint`: start the inner solve (the linear solve)
        where the previous one ended, instead of at `init` (at zero).
    - `resume_solver_state`: resume the inner solver's state from the previous outer step
        (`inner_solve(..., solver_state=...)`). It changes nothing for solvers that keep no
        curvature (gradient descent, optax); a quasi-Newton one then needs `inner_loss` in
        `init`.
    - `precondition`: precondition CG with the inner solver's inverse-Hessian approximation
        ([`bilevax.QuasiNewtonPreconditioner`][]); the solver must keep one (`optx.BFGS`,
        `optx.LBFGS`). It pays with a dense BFGS, hardly with L-BFGS's few curvature pairs.
    - `throw`: whether a failed linear solve raises (the default), or makes the step's
        hypergradient, and so the hyperparameters, NaN (an approximation for a solve cut short
        at its `max_steps`), with `"solve_result"` saying why.
    """

    optimizer: optax.GradientTransformation
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
        check_instance(
            "optimizer",
            self.optimizer,
            optax.GradientTransformation,
            "an `optax.GradientTransformation`, e.g. `optax.adam(1e-2)`",
        )
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
        """$\\epsilon_k$ at outer step `step`."""
        return jnp.maximum(self.initial_tol * self.decay**step, self.final_tol)

    def init(
        self, init: Params, hparams: HParams, inner_loss=None, inner_data: Data = None
    ) -> HOAGState:
        """The state before the first outer step, from the inner solver's starting point.

        **Arguments:**

        - `init`: the inner solver's starting point.
        - `hparams`: the initial hyperparameters.
        - `inner_loss`, `inner_data`: the inner loss and its data, as `step` gets them: they
            build the inner solver's first state (`inner_solve(..., max_steps=0).state`, no
            step taken) when the solver has one to resume; needed then, and unused otherwise.

        **Returns:**

        A [`bilevax.contrib.HOAGState`][].
        """
        hparams = check_hparams(hparams)
        float_init = eqx.filter(init, eqx.is_inexact_array)
        float_hparams = eqx.filter(hparams, eqx.is_inexact_array)
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
            hparams=hparams,
            params=init,
            adjoint=jax.tree.map(jnp.zeros_like, float_init),
            opt_state=self.optimizer.init(float_hparams),
            step=jnp.asarray(0),
            solver_state=solver_state,
        )

    def step(
        self,
        outer_loss,
        inner_loss,
        state: HOAGState,
        init: Params,
        inner_data: Data = None,
        outer_data: Data = None,
    ) -> tuple[HOAGState, dict[str, Any]]:
        """One outer step.

        **Arguments:**

        - `outer_loss`, `inner_loss`: as for [`bilevax.implicit_hypergrad`][].
        - `state`: from `init` or the previous `step`.
        - `init`: the inner solver's cold start (used when `warm_start_params=False`).
        - `inner_data`, `outer_data`: the data for the two losses.

        **Returns:**

        `(state, stats)`: the new state, and a dict with the outer `"value"` and
        `"hypergrad"` at the step's hyperparameters, the `"tol"` used, the `"inner_steps"`
        and `"solve_steps"` taken, the inner `"grad_norm"`, and how the two solves ended
        (`"inner_result"`, a [`bilevax.RESULTS`][]; `"solve_result"`, an `lx.RESULTS`).
        """
        inner_solver = as_inner_solver(self.solver, state.hparams)
        if self.precondition:
            _check_inverse_hessian(inner_solver, inner_loss, init, state.hparams, inner_data)
        # Traced tolerances are fine for both solvers; their annotations say float.
        tol = cast(Any, self.tolerance(state.step))
        start = state.params if self.warm_start_params else init
        sol = inner_solve(
            inner_loss,
            start,
            state.hparams,
            inner_data,
            solver=inner_solver,
            max_steps=self.max_steps,
            tol=tol,
            adjoint=ImplicitAdjoint(),
            solver_state=state.solver_state if self.resume_solver_state else None,
        )
        float_init = eqx.filter(init, eqx.is_inexact_array)
        adjoint_init = (
            state.adjoint if self.warm_start_adjoint else jax.tree.map(jnp.zeros_like, float_init)
        )
        # Pedregosa's ε_k bounds the residual absolutely, as it bounds the inner gradient:
        # ‖Hv − ∇_w E‖ ≤ ε_k max(1, ‖∇_w E‖), never below what the dtype resolves. (The
        # default's relative rule alone is stricter for ‖∇_w E‖ < 1, at no gain in accuracy: the
        # inner solution is only ε_k-accurate.)
        cg = cast(CG, default_linear_solver(float_init, tol))
        cg = dataclasses.replace(cg, atol=cg.rtol, max_steps=self.linear_max_steps)
        linear_solver: lx.AbstractLinearSolver = cg
        if self.precondition:
            preconditioner = QuasiNewtonPreconditioner(inner_solver, sol.state)
            linear_solver = Preconditioned(cg, preconditioner)
        value, hypergrad, adjoint, solve_result, solve_stats = adjoint_hypergrad(
            outer_loss,
            inner_loss,
            sol.params,
            state.hparams,
            inner_data,
            outer_data,
            linear_solver,
            throw=self.throw,
            adjoint_init=adjoint_init,
        )
        float_hparams = eqx.filter(state.hparams, eqx.is_inexact_array)
        # Adam's bias correction mixes an int32 count with floats (strict promotion refuses).
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = self.optimizer.update(hypergrad, state.opt_state, float_hparams)
        hparams = eqx.apply_updates(state.hparams, updates)
        new_state = HOAGState(
            hparams=hparams,
            params=sol.params,
            adjoint=adjoint,
            opt_state=opt_state,
            step=state.step + 1,
            # The carry keeps `init`'s structure: a state only where there was one.
            solver_state=None if state.solver_state is None else sol.state,
        )
        stats = {
            "value": value,
            "hypergrad": hypergrad,
            "tol": tol,
            "inner_steps": sol.stats["num_steps"],
            "solve_steps": solve_stats["num_steps"],
            "grad_norm": sol.stats["grad_norm"],
            "inner_result": sol.result,
            "solve_result": solve_result,
        }
        return new_state, stats


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
