from collections.abc import Callable
from typing import Literal

import equinox as eqx
from jaxtyping import Array

from ._adjoint import UnrolledAdjoint
from ._checks import (
    check_callable,
    check_hparams,
    check_int,
    check_mode,
    check_scalar_loss,
    split_params,
)
from ._custom_types import Data, HParams, InnerLoss, OuterLoss, Params
from ._forward import forward_value_and_grad
from ._inner_solve import inner_solve
from ._iterate import Checkpoints
from ._solver import GradientDescent, SolverLike, as_inner_solver


def unrolled_hypergrad(
    outer_loss: OuterLoss,
    inner_loss: InnerLoss,
    init: Params | Callable[[HParams], Params],
    hparams: HParams,
    inner_data: Data = None,
    outer_data: Data = None,
    *,
    solver: SolverLike = GradientDescent(0.1),
    num_steps: int = 100,
    mode: Literal["reverse", "forward"] = "reverse",
    truncate: int | None = None,
    checkpoints: Checkpoints = None,
) -> tuple[Array, HParams]:
    r"""Hypergradient of $E(w_T(\lambda), \lambda)$, where $w_T$ is the result of `num_steps`
    steps of `solver` on the inner loss from `init` (Franceschi et al. 2017, 2018).

    $$w_{t+1} = \Phi_t(w_t, \lambda), \qquad
    \frac{\mathrm{d}E}{\mathrm{d}\lambda} = \partial_\lambda E
        + \sum_{t=0}^{T-1} \nabla_{w_T} E \cdot
          \Big(\prod_{s=t+1}^{T-1} \partial_w \Phi_s\Big) \partial_\lambda \Phi_t
        \;[+\ \text{the path through } w_0 \text{ if } \texttt{init} \text{ depends on } \lambda].$$

    **Arguments:**

    - `outer_loss`: `(params, hparams, outer_data) -> scalar`, the validation objective $E$.
    - `inner_loss`: `(params, hparams, inner_data) -> scalar`, the training objective $L$.
    - `init`: the initial parameters $w_0$, or a function `hparams -> params` (a learned
        initialisation, MAML-style). A callable Equinox module counts as parameters, not as
        a function.
    - `hparams`: the hyperparameters $\lambda$, any pytree; the hypergradient is taken with
        respect to its floating-point arrays.
    - `inner_data`, `outer_data`: any pytrees passed to the two losses.
    - `solver`: a [`bilevax.GradientDescent`][], `optax.GradientTransformation`, `optimistix`
        minimiser, or a callable `hparams -> solver` (a learned step size).
    - `num_steps`: $T$, the number of inner steps.
    - `mode`: `"reverse"` (ReverseHG: back-propagation through the steps; cost a small multiple
        of the forward pass, memory $O(T)$) or `"forward"` (ForwardHG: propagates
        $\mathrm{d}w_t/\mathrm{d}\lambda$ alongside $w_t$; memory independent of $T$, cost
        linear in the number of scalar hyperparameters).
    - `truncate`: back-propagate through the last `truncate` steps only (Shaban et al. 2019).
    - `checkpoints`: `None` (store every step), an int $k$ (store $k$ states and recompute
        the rest in the backward pass: memory $O(\sqrt{T})$ at $k = \sqrt{T}$) or
        `"recursive"` (nested levels: memory $O(\log T)$); see
        [`bilevax.UnrolledAdjoint`][]. Forward mode stores no steps, whichever is chosen.

    **Returns:**

    `(value, hypergrad)` as `jax.value_and_grad` returns them: the outer loss at $w_T$ and its
    total derivative, with the structure of `hparams` (including the direct term
    $\partial_\lambda E$; `None` at non-floating-point leaves). It is
    `inner_solve(..., max_steps=num_steps, adjoint=bx.UnrolledAdjoint(checkpoints, truncate))`
    differentiated; an unroll that goes non-finite gives NaN, never a finite hypergradient.
    """
    check_callable("outer_loss", outer_loss)
    check_callable("inner_loss", inner_loss)
    check_int("num_steps", num_steps, 0)
    check_mode(mode)
    hparams = check_hparams(hparams)
    adjoint = UnrolledAdjoint(checkpoints=checkpoints, truncate=truncate)
    init_fn = init if _is_function(init) else (lambda _: init)
    params0 = init_fn(hparams)
    split_params(params0, "init")
    check_scalar_loss("outer_loss", outer_loss, params0, hparams, outer_data, "init")
    as_inner_solver(solver, hparams)  # fail early, outside any transformation, on a bad solver

    def objective(hparams):
        solution = inner_solve(
            inner_loss,
            init_fn(hparams),
            hparams,
            inner_data,
            solver=solver,
            max_steps=num_steps,
            tol=0.0,
            adjoint=adjoint,
        )
        return outer_loss(solution.params, hparams, outer_data)

    if mode == "forward":
        return forward_value_and_grad(objective, hparams)
    return eqx.filter_value_and_grad(objective)(hparams)


def _is_function(init) -> bool:
    return callable(init) and not isinstance(init, eqx.Module)
