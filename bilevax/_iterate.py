"""The two drivers of an inner solver: a `while_loop` to a tolerance, and a fixed-length unroll."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar

from ._checks import check_same_structure
from ._misc import stop_gradient, tree_isfinite, tree_norm, tree_where_nan
from ._solution import RESULTS
from ._solver import AbstractInnerSolver, Loss


def solve_to_tolerance(
    fn: Loss,
    params: PyTree[Array],
    args,
    solver: AbstractInnerSolver,
    max_steps: int,
    tol,
    solver_state: PyTree[Array] | None = None,
) -> tuple[PyTree[Array], RESULTS, dict[str, Array], PyTree[Array]]:
    """Steps `solver` until `‖residual‖ <= tol` (the gradient, unless the solver has its own
    residual, as a proximal one does), a non-finite value, or `max_steps` steps. Returns
    `(params, result, stats, state)`, with `state` the array part of the final solver state
    (see `start_state`).

    Not differentiable in reverse mode (it is a `while_loop`): callers attach derivatives
    with the implicit function theorem. Under `vmap` each batch element stops on its own
    test, because a batched `while_loop` freezes the elements whose condition is false.
    """
    dynamic_state, static_state = start_state(solver, fn, params, args, solver_state)
    loss, grad = jax.value_and_grad(fn)(params, args)

    def finite(loss, grad):
        return jnp.isfinite(loss) & tree_isfinite(grad)

    def residual_norm(params, grad):
        return tree_norm(solver.residual(fn, params, grad, args))

    def cond(carry):
        params, _, loss, grad, num_steps = carry
        return (num_steps < max_steps) & (residual_norm(params, grad) > tol) & finite(loss, grad)

    def body(carry):
        params, dynamic_state, _, grad, num_steps = carry
        state = eqx.combine(dynamic_state, static_state)
        params, state = solver.step(fn, params, grad, state, args)
        loss, grad = solver.value_and_grad(fn, params, state, args)
        dynamic_state, _ = eqx.partition(state, eqx.is_array)
        return params, dynamic_state, loss, grad, num_steps + 1

    # A step counter made from `loss` (not a fresh constant) takes the batch's sharding when
    # vmapped over tasks on an `Explicit` mesh; `jnp.asarray(0)` has no mesh and fails there.
    init_carry = (params, dynamic_state, loss, grad, jnp.zeros_like(loss, dtype=int))
    params, dynamic_state, loss, grad, num_steps = jax.lax.while_loop(cond, body, init_carry)
    grad_norm = residual_norm(params, grad)
    result = result_from(loss, grad, grad_norm, tol)
    # The last finite iterate of a diverged solve would be a plausible wrong answer; so would
    # a warm start carried from it.
    failed = result == RESULTS.nonfinite
    params = tree_where_nan(failed, params)
    dynamic_state = tree_where_nan(failed, dynamic_state)
    return params, result, {"num_steps": num_steps, "grad_norm": grad_norm}, dynamic_state


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
    grad = jax.tree.map(jnp.zeros_like, params)
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


def result_from(loss: Scalar, grad: PyTree[Array], grad_norm: Scalar, tol) -> RESULTS:
    is_finite = jnp.isfinite(loss) & tree_isfinite(grad)
    converged = RESULTS.where(grad_norm <= tol, RESULTS.successful, RESULTS.max_steps_reached)
    return RESULTS.where(is_finite, converged, RESULTS.nonfinite)


def unroll(
    fn: Loss,
    params: PyTree[Array],
    args,
    solver: AbstractInnerSolver,
    num_steps: int,
    *,
    checkpoints: int | None = None,
    truncate: int | None = None,
    solver_state: PyTree[Array] | None = None,
) -> tuple[PyTree[Array], PyTree[Array]]:
    """Exactly `num_steps` solver steps, written so JAX can differentiate through them;
    returns the parameters and the array part of the final solver state (see `start_state`).

    - `checkpoints=k` stores the state at `k` segment boundaries and recomputes each segment
        during the backward pass (`jax.checkpoint`): one extra forward pass, and memory for `k`
        states plus one segment's worth, `num_steps // k` steps.
    - `truncate=K` cuts the derivative before the last `K` steps (Shaban et al. 2019).
    """
    grad_fn = jax.grad(fn)
    dynamic_state, static_state = start_state(solver, fn, params, args, solver_state)

    def step(carry):
        params, dynamic_state = carry
        state = eqx.combine(dynamic_state, static_state)
        params, state = solver.step(fn, params, grad_fn(params, args), state, args)
        dynamic_state, _ = eqx.partition(state, eqx.is_array)
        return params, dynamic_state

    carry = (params, dynamic_state)
    if truncate is not None and truncate < num_steps:
        carry = stop_gradient(_repeat(step, carry, num_steps - truncate, checkpoints))
        num_steps = truncate
    return _repeat(step, carry, num_steps, checkpoints)


def _repeat(step, carry, num_steps: int, checkpoints: int | None):
    if checkpoints is None or checkpoints >= num_steps:
        return _scan(step, carry, num_steps)
    segment = num_steps // checkpoints
    # `prevent_cse=False` is safe (and faster) inside `scan`, which already stops CSE.
    run_segment = jax.checkpoint(lambda c: _scan(step, c, segment), prevent_cse=False)
    carry = _scan(run_segment, carry, checkpoints)
    return _scan(step, carry, num_steps - segment * checkpoints)


def _scan(step, carry, length: int):
    if length == 0:
        return carry
    carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, length=length)
    return carry
