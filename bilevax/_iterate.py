"""The loop driver of an inner solver: it owns the iteration (a `while_loop` to a tolerance, or
a fixed-length unroll that JAX differentiates) and, once, the result and its failure policy.
An adjoint only chooses which loop runs and how its output is differentiated."""

from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar

from ._checks import check_same_structure
from ._custom_types import Data, HParams
from ._ift import optimality_for
from ._misc import stop_gradient, tree_isfinite, tree_norm, tree_where_nan
from ._solution import RESULTS
from ._solver import AbstractInnerSolver, Loss


Outcome = tuple[PyTree[Array], RESULTS, dict[str, Array], PyTree[Array]]
# How an unroll stores its states for the backward pass: all of them (`None`), `k` evenly
# spaced ones (one level of checkpointing), or nested levels (`"recursive"`).
Checkpoints = int | Literal["recursive"] | None
# The number of segments each level of recursive checkpointing splits its steps into. Eight
# cost less recomputation than two (⌊log₈ T⌋ + 1 forward passes, not ⌊log₂ T⌋ + 1) and compile in a
# fraction of the time, for about the same memory (measured in `docs/scaling.md`).
RECURSIVE_BRANCHING = 8


class InnerLoop(eqx.Module):
    """One inner solve, as [`bilevax.inner_solve`][] sets it up, for an adjoint to run.

    Both loops return `(params, result, stats, state)`: the floating-point parameters, a
    [`bilevax.RESULTS`][], `{"num_steps", "grad_norm"}` and the array part of the final
    solver state. A loop that went non-finite returns NaN parameters and state, never its
    last finite iterate (`finish`)."""

    inner_loss: Any  # closure-converted `(params, hparams, data) -> scalar`: a pytree
    static_params: PyTree
    solver: AbstractInnerSolver
    max_steps: int = eqx.field(static=True)
    tol: Any
    solver_state: PyTree[Array] | None

    def loss(self, params: PyTree[Array], args) -> Scalar:
        """The inner loss in the solvers' signature, `(float_params, (hparams, data))`."""
        return self.inner_loss(eqx.combine(params, self.static_params), *args)

    def optimality(self, hparams: HParams, data: Data):
        """The optimality condition of the solution, its inputs, and whether its Jacobian is
        symmetric (see `_ift.optimality_for`)."""
        return optimality_for(self.solver, self.static_params, self.inner_loss, hparams, data)

    def to_tolerance(self, params: PyTree[Array], hparams: HParams, data: Data) -> Outcome:
        """Steps until the residual norm is at most `tol`, a non-finite value, or `max_steps`
        (a `while_loop`: not differentiable in reverse mode)."""
        args = (hparams, data)
        params, state, num_steps, final = solve_to_tolerance(
            self.loss, params, args, self.solver, self.max_steps, self.tol, self.solver_state
        )
        return self.finish(params, args, state, num_steps, final)

    def unrolled(
        self,
        params: PyTree[Array],
        hparams: HParams,
        data: Data,
        checkpoints: Checkpoints,
        truncate: int | None,
    ) -> Outcome:
        """Exactly `max_steps` steps, differentiable (see `unroll`)."""
        args = (hparams, data)
        # A carried state is a warm start, not a function of these hyperparameters.
        params, state = unroll(
            self.loss,
            params,
            args,
            self.solver,
            self.max_steps,
            checkpoints=checkpoints,
            truncate=truncate,
            solver_state=stop_gradient(self.solver_state),
        )
        final = jax.value_and_grad(self.loss)(stop_gradient(params), stop_gradient(args))
        return self.finish(params, args, state, jnp.asarray(self.max_steps), final)

    def finish(self, params, args, state, num_steps, final) -> Outcome:
        """The result policy of both loops, from the `final` loss and gradient: the result
        from the final residual, and NaN parameters and state for a loop that went
        non-finite (its last finite iterate, or a warm start carried from it, would be a
        plausible wrong answer)."""
        loss, grad = final
        residual = self.solver.residual(self.loss, stop_gradient(params), grad, stop_gradient(args))
        grad_norm = tree_norm(residual)
        finite = jnp.isfinite(loss) & tree_isfinite(grad)
        converged = RESULTS.where(
            grad_norm <= self.tol, RESULTS.successful, RESULTS.max_steps_reached
        )
        result = RESULTS.where(finite, converged, RESULTS.nonfinite)
        failed = result == RESULTS.nonfinite
        params = tree_where_nan(failed, params)
        state = tree_where_nan(failed, stop_gradient(state))
        return params, result, {"num_steps": num_steps, "grad_norm": grad_norm}, state


def solve_to_tolerance(
    fn: Loss,
    params: PyTree[Array],
    args,
    solver: AbstractInnerSolver,
    max_steps: int,
    tol,
    solver_state: PyTree[Array] | None = None,
) -> tuple[PyTree[Array], PyTree[Array], Array, tuple[Scalar, PyTree[Array]]]:
    """Steps `solver` until `‖residual‖ <= tol` (the gradient, unless the solver has its own
    residual, as a proximal one does), a non-finite value, or `max_steps` steps. Returns
    `(params, state, num_steps, (loss, grad))`, with `state` the array part of the final
    solver state (see `start_state`) and the loss and gradient at the returned `params`.

    A solver that `evaluates_own_gradient` (FISTA) is tested where its step evaluated the
    gradient (`stopping_test`), and the gradient at the returned `params` is evaluated once,
    after the loop, for the result.

    Not differentiable in reverse mode (it is a `while_loop`): callers attach derivatives
    with the implicit function theorem. Under `vmap` each batch element stops on its own
    test, because a batched `while_loop` freezes the elements whose condition is false.
    """
    dynamic_state, static_state = start_state(solver, fn, params, args, solver_state)
    own_gradient = solver.evaluates_own_gradient

    def tested(params, loss, grad):
        """The carry's `(loss, grad, residual_norm, finite)` from the gradient at `params`:
        `grad` is what the next step takes (none for a solver that evaluates its own)."""
        norm = tree_norm(solver.residual(fn, params, grad, args))
        finite = jnp.isfinite(loss) & tree_isfinite(grad)
        return loss, (None if own_gradient else grad), norm, finite

    def cond(carry):
        *_, norm, finite, num_steps = carry
        return (num_steps < max_steps) & (norm > tol) & finite

    def body(carry):
        params, dynamic_state, _, grad, _, _, num_steps = carry
        state = eqx.combine(dynamic_state, static_state)
        params, state = solver.step(fn, params, grad, state, args)
        if own_gradient:
            loss, norm = solver.stopping_test(fn, params, state, args)
            evaluated = (loss, None, norm, jnp.isfinite(loss) & jnp.isfinite(norm))
        else:
            evaluated = tested(params, *solver.value_and_grad(fn, params, state, args))
        dynamic_state, _ = eqx.partition(state, eqx.is_array)
        return params, dynamic_state, *evaluated, num_steps + 1

    loss, grad = jax.value_and_grad(fn)(params, args)
    # A step counter made from `loss` (not a fresh constant) takes the batch's sharding when
    # vmapped over tasks on an `Explicit` mesh; `jnp.asarray(0)` has no mesh and fails there.
    counter = jnp.zeros_like(loss, dtype=int)
    init_carry = (params, dynamic_state, *tested(params, loss, grad), counter)
    params, dynamic_state, *final, _, _, num_steps = jax.lax.while_loop(cond, body, init_carry)
    if own_gradient:
        final = jax.value_and_grad(fn)(params, args)
    return params, dynamic_state, num_steps, tuple(final)


def start_state(
    solver: AbstractInnerSolver,
    fn: Loss,
    params: PyTree[Array],
    args,
    solver_state: PyTree[Array] | None,
) -> tuple[PyTree[Array], PyTree]:
    """The solver's state at `params`, split into its arrays and the rest.

    The arrays are what a solve returns as its state and what a later solve accepts as
    `solver_state`: a pytree of arrays that can be carried through `lax.scan` or `vmap`
    (a whole state holds functions, such as L-BFGS's inverse-Hessian operator). With a
    `solver_state` from an earlier solve, the solver keeps what is still valid of it
    (`AbstractInnerSolver.resume`)."""
    state = solver.init(fn, params, args)
    _check_step_keeps_types(solver, fn, params, state, args)
    dynamic_state, static_state = eqx.partition(state, eqx.is_array)
    if solver_state is None:
        return dynamic_state, static_state
    check_same_structure(
        "solver_state",
        solver_state,
        dynamic_state,
        "the solver's state at `init` (`inner_solve(..., max_steps=0).state`)",
    )
    previous = eqx.combine(solver_state, static_state)
    state = solver.resume(fn, params, args, previous)
    dynamic_state, _ = eqx.partition(state, eqx.is_array)
    return dynamic_state, static_state


def _check_step_keeps_types(solver, fn, params, state, args) -> None:
    """Traces one step (no FLOPs) and refuses one that changes a parameter's dtype or shape,
    naming the leaf: the loops need a step that maps the parameters to their own type, and
    would otherwise fail with JAX's message about a loop carry. A float32 `init` stepped by a
    float64 step size computed from the data under x64 is the usual cause."""
    grad = None if solver.evaluates_own_gradient else jax.tree.map(jnp.zeros_like, params)
    stepped, _ = eqx.filter_eval_shape(solver.step, fn, params, grad, state, args)
    before = jax.tree_util.tree_flatten_with_path(params)[0]
    after = jax.tree.leaves(stepped)
    for (path, old), new in zip(before, after):
        if (old.dtype, old.shape) != (new.dtype, new.shape):
            where = jax.tree_util.keystr(path) or "the parameters"
            raise TypeError(
                f"the inner solver's step changed {where} from {old.dtype}{list(old.shape)} to "
                f"{new.dtype}{list(new.shape)}; a step must keep each parameter's dtype and "
                "shape. Give `init` the dtype of the step (or a step size of `init`'s dtype: "
                "under x64 a step size computed from float64 data is float64)."
            )


def unroll(
    fn: Loss,
    params: PyTree[Array],
    args,
    solver: AbstractInnerSolver,
    num_steps: int,
    *,
    checkpoints: Checkpoints = None,
    truncate: int | None = None,
    solver_state: PyTree[Array] | None = None,
) -> tuple[PyTree[Array], PyTree[Array]]:
    """Exactly `num_steps` solver steps, written so JAX can differentiate through them;
    returns the parameters and the array part of the final solver state (see `start_state`).

    - `checkpoints=k` stores the state at `k` segment boundaries and recomputes each segment
        during the backward pass (`jax.checkpoint`): one extra forward pass, and memory for `k`
        states plus one segment's worth, `num_steps // k` steps.
    - `checkpoints="recursive"` nests such levels (see `_recursive`): memory for
        O(log T) states, and each step runs forward at most ⌊log₈ T⌋ + 1 times.
    - `truncate=K` cuts the derivative before the last `K` steps (Shaban et al. 2019).
    """
    dynamic_state, static_state = start_state(solver, fn, params, args, solver_state)

    def step(carry):
        params, dynamic_state = carry
        state = eqx.combine(dynamic_state, static_state)
        grad = None if solver.evaluates_own_gradient else jax.grad(fn)(params, args)
        params, state = solver.step(fn, params, grad, state, args)
        dynamic_state, _ = eqx.partition(state, eqx.is_array)
        return params, dynamic_state

    carry = (params, dynamic_state)
    if truncate is not None and truncate < num_steps:
        carry = stop_gradient(_repeat(step, carry, num_steps - truncate, checkpoints))
        num_steps = truncate
    return _repeat(step, carry, num_steps, checkpoints)


def _repeat(step, carry, num_steps: int, checkpoints: Checkpoints):
    if checkpoints == "recursive":
        return _recursive(step, carry, num_steps)
    if checkpoints is None or checkpoints >= num_steps:
        return _scan(step, carry, num_steps)
    segment = num_steps // checkpoints
    # `prevent_cse=False` is safe (and faster) inside `scan`, which already stops CSE.
    run_segment = jax.checkpoint(lambda c: _scan(step, c, segment), prevent_cse=False)
    carry = _scan(run_segment, carry, checkpoints)
    return _scan(step, carry, num_steps - segment * checkpoints)


def _recursive(step, carry, num_steps: int):
    r"""`num_steps` steps as nested checkpointed scans: recursive checkpointing (Griewank
    1992), with the schedule fixed at trace time because the number of steps is.

    With $b$ = `RECURSIVE_BRANCHING`, a block of $b^i$ steps is a checkpointed scan over $b$
    blocks of $b^{i-1}$ steps; its backward pass keeps the $b$ states at its sub-blocks'
    starts and recomputes each sub-block from its start in turn. `num_steps`
    $= \sum_i d_i b^i$ (its digits in base $b$) runs as scans of $d_i$ blocks of $b^i$ steps,
    the largest first. The backward pass then holds $d_i \le b - 1$ states per digit's scan
    and $b$ per level being recomputed, under $2b(\lfloor\log_b T\rfloor + 1)$ in all, and
    each step runs forward at most $\lfloor\log_b T\rfloor + 1$ times (once, plus once per
    level of blocks it is in).

    Unlike a `custom_vjp` schedule (equinox's online treeverse), this is plain
    `jax.checkpoint` and `lax.scan`: forward mode, `vmap` and higher derivatives go through
    it as through the plain unroll."""
    digits = []
    while num_steps:
        num_steps, digit = divmod(num_steps, RECURSIVE_BRANCHING)
        digits.append(digit)

    def block(level):
        if level == 0:
            return step
        sub_block = block(level - 1)
        # `prevent_cse=False` is safe (and faster) inside `scan`, which already stops CSE.
        run = lambda c: _scan(sub_block, c, RECURSIVE_BRANCHING)
        return jax.checkpoint(run, prevent_cse=False)

    for level in reversed(range(len(digits))):
        carry = _scan(block(level), carry, digits[level])
    return carry


def _scan(step, carry, length: int):
    if length == 0:
        return carry
    carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, length=length)
    return carry
