r"""Single-loop stochastic bilevel solvers: SOBA and SABA (Dagréou et al. 2022), and the
driver, state and failure channel that the first-order methods of `_first_order.py` share.

In the notation and sign convention of the rest of bilevax ($w$ the inner variables, $\lambda$
the hyperparameters, $L$ the inner loss, $E$ the outer loss, $H = \nabla^2_w L$), the inner
variables $w$, the adjoint $v$ and the hyperparameters $\lambda$ move together, each along a
direction that is a mean of per-sample terms, so that a mini-batch gives an unbiased estimate of
it:

$$D_w = \nabla_w L, \qquad D_v = H v - \nabla_w E, \qquad
  D_\lambda = \partial_\lambda E - (\partial^2_{\lambda w} L)\, v.$$

At $w = w^*(\lambda)$ and $v = v^* = H^{-1} \nabla_w E$ (the zeros of $D_w$ and $D_v$),
$D_\lambda$ is the implicit hypergradient, with the sign of [`bilevax.implicit_hypergrad`][],
and $v^*$ is its adjoint. (Dagréou et al. write the adjoint with the opposite sign.)
"""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Int, PRNGKeyArray, PyTree

from .._checks import (
    _describe,
    check_callable,
    check_instance,
    check_int,
    check_real,
    check_same_structure,
    check_scalar_loss,
)
from .._custom_types import Data, HParams, InnerLoss, OuterLoss, Params
from .._misc import tree_isfinite, tree_where_nan
from .._solution import RESULTS


StepSize = ArrayLike | Callable[[Array], ArrayLike]


class Directions(eqx.Module):
    r"""The three directions of the single-loop framework, as
    [`bilevax.contrib.stochastic_directions`][] returns them.

    **Attributes:**

    - `params`: $D_w$, shaped like `params`.
    - `v`: $D_v$, shaped like `params`.
    - `hparams`: $D_\lambda$, shaped like `hparams`.
    """

    params: PyTree[Array]
    v: PyTree[Array]
    hparams: PyTree[Array]


def _inner_oracles(inner_loss, params, v, hparams, batch):
    r"""$\nabla_w L$, and $(H v, (\partial^2_{\lambda w} L)\, v)$ from one VJP of it.

    Not `_ift`'s statement of the hypergradient (`_hypergrad.hypergrad_from_adjoint`), on
    purpose: there $H$ comes from a linearisation of $\nabla_w L$ in $w$ and $B^\top v$ from
    a second pullback in $\lambda$, two passes over the batch; a stochastic step, whose
    whole cost is its oracles, gets $H v$ and $B^\top v$ from one pullback with respect to
    $(w, \lambda)$ together. `tests/core/test_stochastic.py` checks that $D_\lambda$ equals
    `hypergrad_from_adjoint` at any $(w, v)$, not only at the solution."""
    grad_w = lambda w, lam: jax.grad(inner_loss)(w, lam, batch)
    grad, vjp = jax.vjp(grad_w, params, hparams)
    hvp, cross = vjp(v)  # the Hessian is symmetric, so the VJP with v is H v
    return grad, hvp, cross


def _outer_oracles(outer_loss, params, hparams, batch):
    r"""$(\nabla_w E, \partial_\lambda E)$."""
    return jax.grad(outer_loss, argnums=(0, 1))(params, hparams, batch)


def _combine(grad, hvp, cross, outer_grad_w, outer_grad_lam) -> Directions:
    sub = lambda a, b: jax.tree.map(jnp.subtract, a, b)
    directions = (grad, sub(hvp, outer_grad_w), sub(outer_grad_lam, cross))
    # A NaN in one sample reaches only the entries that depend on it (a NaN target reaches
    # D_v but not D_λ); the rest would look right. The failure policy makes all of them NaN.
    directions = tree_where_nan(~tree_isfinite(directions), directions)
    return Directions(*directions)


def stochastic_directions(
    outer_loss: OuterLoss,
    inner_loss: InnerLoss,
    params: Params,
    v: Params,
    hparams: HParams,
    inner_batch: Data,
    outer_batch: Data,
) -> Directions:
    r"""The directions of the single-loop framework of Dagréou et al. (2022) on one batch:

    $$D_w = \nabla_w L, \qquad D_v = H v - \nabla_w E, \qquad
      D_\lambda = \partial_\lambda E - (\partial^2_{\lambda w} L)\, v,$$

    with $L$ = `inner_loss` on `inner_batch`, $E$ = `outer_loss` on `outer_batch` and
    $H = \nabla^2_w L$, using one gradient of $L$, one VJP of that gradient (for both
    second-order terms) and one gradient of $E$. With full batches, at $w = w^*$ and
    $v = H^{-1} \nabla_w E$, $D_w = D_v = 0$ and $D_\lambda$ is the implicit hypergradient of
    [`bilevax.implicit_hypergrad`][] (same sign; $v$ is its adjoint). A non-finite value in
    the data or the iterates makes all three directions NaN.

    **Arguments:**

    - `outer_loss`, `inner_loss`: `(params, hparams, batch) -> scalar`.
    - `params`, `v`: pytrees of floating-point arrays of the same structure ($w$ and $v$).
    - `hparams`: a pytree of floating-point arrays ($\lambda$).
    - `inner_batch`, `outer_batch`: the data passed to `inner_loss` and `outer_loss`.

    **Returns:**

    A [`bilevax.contrib.Directions`][] with fields `params` ($D_w$), `v` ($D_v$) and
    `hparams` ($D_\lambda$).
    """
    check_callable("outer_loss", outer_loss)
    check_callable("inner_loss", inner_loss)
    check_same_structure("v", v, params, "params")
    grad, hvp, cross = _inner_oracles(inner_loss, params, v, hparams, inner_batch)
    outer_grad_w, outer_grad_lam = _outer_oracles(outer_loss, params, hparams, outer_batch)
    return _combine(grad, hvp, cross, outer_grad_w, outer_grad_lam)


class StochasticState(eqx.Module):
    r"""The state of a single-loop stochastic bilevel solver, as its `init` and `step` return
    it.

    **Attributes:**

    - `params`: the inner variables $w$.
    - `v`: the adjoint $v$, an estimate of $H^{-1} \nabla_w E$ (`None` for the first-order
        methods [`bilevax.contrib.F2SA`][] and [`bilevax.contrib.BOME`][], which have none).
    - `hparams`: the hyperparameters $\lambda$.
    - `num_steps`: the number of steps taken.
    - `result`: [`bilevax.RESULTS`][]`.successful`, or `RESULTS.nonfinite` from the first
        step (or `init`) at which any of `params`, `v`, `hparams` (and F2SA's `memory`) was
        non-finite; from then on all of them are NaN, so that no finite number comes out of
        a failed run.
    - `memory`: the solver's own state: SABA's table of per-sample oracles, F2SA's iterate
        $y$ of the penalised problem; `None` for SOBA and BOME.
    """

    params: PyTree[Array]
    v: PyTree[Array]
    hparams: PyTree[Array]
    num_steps: Int[Array, ""]
    result: RESULTS
    memory: PyTree[Array] | None = None


def _checked_state(
    params, v, hparams, num_steps, memory, failed: Bool[Array, ""], memory_is_iterate: bool
):
    """The state, with the failure policy applied: once any iterate is non-finite (now, or at
    an earlier step as `failed` says), all of them are NaN and `result` is `nonfinite`.
    `memory` counts as an iterate where the solver says so (F2SA's $y$); SABA's table does
    not, since rewriting it would cost O(n) per step."""
    iterates = (params, v, hparams, memory) if memory_is_iterate else (params, v, hparams)
    failed = failed | ~tree_isfinite(iterates)
    iterates = tree_where_nan(failed, iterates)
    if memory_is_iterate:
        params, v, hparams, memory = iterates
    else:
        params, v, hparams = iterates
    result = RESULTS.where(failed, RESULTS.nonfinite, RESULTS.successful)
    return StochasticState(params, v, hparams, num_steps, result, memory)


class AbstractStochasticBilevel(eqx.Module):
    """Base class of the stochastic bilevel solvers that [`bilevax.contrib.stochastic_bilevel`][]
    runs: SOBA and SABA, and the first-order F2SA and BOME.

    Data convention: `inner_data` and `outer_data` are pytrees of arrays that all have a
    leading axis of samples (`n_inner` and `n_outer` of them), and each loss is the **mean**
    over the samples of the batch it is given, so that a uniformly sampled mini-batch gives
    an unbiased estimate of the full loss and its derivatives.
    """

    inner_lr: eqx.AbstractVar[StepSize]
    outer_lr: eqx.AbstractVar[StepSize]
    batch_size: eqx.AbstractVar[int | None]
    outer_batch_size: eqx.AbstractVar[int | None]

    def init(
        self,
        outer_loss: OuterLoss,
        inner_loss: InnerLoss,
        params: Params,
        hparams: HParams,
        inner_data: Data,
        outer_data: Data,
        v: Params | None = None,
        key: PRNGKeyArray | None = None,
    ) -> StochasticState:
        r"""The state before the first step.

        **Arguments:**

        - `outer_loss`, `inner_loss`: `(params, hparams, batch) -> scalar`, means over the
            batch's samples.
        - `params`, `hparams`: the starting $w$ and $\lambda$, pytrees of floating-point
            arrays.
        - `inner_data`, `outer_data`: pytrees of arrays with a leading axis of samples.
        - `v`: the starting adjoint, shaped like `params`; zeros by default. The
            first-order methods have no adjoint and take none.
        - `key`: draws SABA's first batches (the others ignore it).

        **Returns:**

        A [`bilevax.contrib.StochasticState`][] at step 0.
        """
        _check(outer_loss, inner_loss, params, hparams, inner_data, outer_data)
        if not self.has_adjoint:
            if v is not None:
                raise ValueError(
                    f"`v` must be None: `{type(self).__name__}` is a first-order method and "
                    "keeps no adjoint."
                )
        elif v is None:
            v = jax.tree.map(jnp.zeros_like, params)
        else:
            check_same_structure("v", v, params, "params")
        if key is None:
            key = jax.random.key(0)
        memory = self._init_memory(
            outer_loss, inner_loss, params, v, hparams, inner_data, outer_data, key
        )
        num_steps = jnp.zeros((), jnp.int32)
        # The data are checked once, here: a mini-batch that has not yet drawn a NaN sample
        # would otherwise give finite iterates from data that have none.
        data_failed = ~tree_isfinite((inner_data, outer_data))
        return _checked_state(
            params, v, hparams, num_steps, memory, data_failed, self.memory_is_iterate
        )

    # Whether the solver keeps its own state in `memory` (SABA's table, F2SA's y), whether
    # that memory is an iterate the failure policy NaNs (F2SA's y), and whether the solver
    # keeps an adjoint `v` (SOBA, SABA).
    has_memory: ClassVar[bool] = False
    memory_is_iterate: ClassVar[bool] = False
    has_adjoint: ClassVar[bool] = True

    def _init_memory(self, outer_loss, inner_loss, params, v, hparams, inner_data, outer_data, key):
        del outer_loss, inner_loss, params, v, hparams, inner_data, outer_data, key
        return None

    @abc.abstractmethod
    def _update(
        self, outer_loss, inner_loss, state, inner_data, outer_data, key
    ) -> tuple[PyTree[Array], PyTree[Array] | None, PyTree[Array], PyTree[Array] | None]:
        """The next `(params, v, hparams, memory)`, before the failure policy."""

    def step(
        self,
        outer_loss: OuterLoss,
        inner_loss: InnerLoss,
        state: StochasticState,
        inner_data: Data,
        outer_data: Data,
        key: PRNGKeyArray,
    ) -> StochasticState:
        r"""One step. SOBA and SABA: $w \leftarrow w - \rho_t D_w$,
        $v \leftarrow v - \rho_t D_v$, $\lambda \leftarrow \lambda - \gamma_t D_\lambda$;
        F2SA and BOME: as their pages say. SOBA, F2SA and BOME draw this step's mini-batches
        with `key`; SABA draws the next step's (its first at `init`), for the reason given in
        its source. Pure: jit it, scan it, or vmap it over tasks.

        **Arguments:**

        - `outer_loss`, `inner_loss`: as given to `init`.
        - `state`: the state from `init` or the previous step.
        - `inner_data`, `outer_data`: as given to `init`.
        - `key`: a JAX PRNG key for the mini-batches.

        **Returns:**

        The next [`bilevax.contrib.StochasticState`][]; its `result` is `RESULTS.nonfinite`,
        and its iterates NaN, once any iterate has been non-finite.
        """
        check_instance(
            "state", state, StochasticState, f"the state from `{type(self).__name__}.init`"
        )
        if (state.memory is not None) != self.has_memory or (
            state.v is not None
        ) != self.has_adjoint:
            raise ValueError(
                f"`state` must come from `{type(self).__name__}.init`: its memory (SABA's table "
                "of per-sample oracles, F2SA's y) or its adjoint `v` does not match this "
                "solver's."
            )
        params, v, hparams, memory = self._update(
            outer_loss, inner_loss, state, inner_data, outer_data, key
        )
        return _checked_state(
            params,
            v,
            hparams,
            state.num_steps + 1,
            memory,
            state.result == RESULTS.nonfinite,
            self.memory_is_iterate,
        )

    def samples_per_step(self, inner_data: Data, outer_data: Data) -> tuple[int, int]:
        """The inner and outer batch sizes: how many samples each of the step's oracles is
        evaluated on (all of them where a batch size is `None`)."""
        n_inner, n_outer = (
            num_samples(inner_data, "inner_data"),
            num_samples(outer_data, "outer_data"),
        )
        return (
            n_inner if self.batch_size is None else self.batch_size,
            n_outer if self.outer_batch_size is None else self.outer_batch_size,
        )

    def evaluations_per_step(self, inner_data: Data, outer_data: Data) -> dict[str, int]:
        """Per-sample oracle evaluations one step makes: `"inner_gradients"` (of the inner
        loss), `"inner_second_order"` (Hessian- or cross-derivative-vector products of the
        inner loss; one VJP of the gradient gives both of SOBA's) and `"outer_gradients"`.
        SABA's `init` makes one more pass over both data sets, not counted here."""
        b_in, b_out = self.samples_per_step(inner_data, outer_data)
        return {"inner_gradients": b_in, "inner_second_order": b_in, "outer_gradients": b_out}


def _move(tree, direction, lr):
    """`tree - lr * direction`, leaf by leaf. A schedule's value may have its own dtype (an
    int step count over a float gives float32): it is cast to each leaf's, so that float64
    iterates stay float64."""
    return jax.tree.map(lambda a, b: a - jnp.asarray(lr).astype(a.dtype) * b, tree, direction)


class _SingleLoop(AbstractStochasticBilevel):
    r"""SOBA and SABA: one SGD step on $(w, v, \lambda)$ along estimated directions."""

    @abc.abstractmethod
    def _directions(
        self, outer_loss, inner_loss, state, inner_data, outer_data, key
    ) -> tuple[Directions, PyTree[Array] | None]:
        """The step's directions and the new memory."""

    def _update(self, outer_loss, inner_loss, state, inner_data, outer_data, key):
        directions, memory = self._directions(
            outer_loss, inner_loss, state, inner_data, outer_data, key
        )
        rho = _step_size(self.inner_lr, state.num_steps)
        gamma = _step_size(self.outer_lr, state.num_steps)
        return (
            _move(state.params, directions.params, rho),
            _move(state.v, directions.v, rho),
            _move(state.hparams, directions.hparams, gamma),
            memory,
        )


class SOBA(_SingleLoop):
    r"""SOBA, the StOchastic Bilevel Algorithm of Dagréou et al. (2022): SGD on
    $(w, v, \lambda)$ jointly along the directions of
    [`bilevax.contrib.stochastic_directions`][], each estimated on a fresh mini-batch
    (indices drawn uniformly with replacement).

    With step sizes $\rho_t \propto t^{-2/5}$ and $\gamma_t \propto t^{-3/5}$ it converges to
    a stationary point of $h(\lambda) = E(w^*(\lambda), \lambda)$; with constant steps it
    stalls at a noise floor proportional to the step sizes (SABA removes it).

    **Arguments:**

    - `inner_lr`: $\rho$, the step size of $w$ and $v$: a float or a schedule
        `step -> float` (e.g. an `optax` schedule).
    - `outer_lr`: $\gamma$, the step size of $\lambda$, likewise.
    - `batch_size`: inner samples per step; `None` uses all of them (deterministic).
    - `outer_batch_size`: outer samples per step; `None` uses all of them.
    """

    inner_lr: StepSize
    outer_lr: StepSize
    batch_size: int | None = eqx.field(static=True, default=64)
    outer_batch_size: int | None = eqx.field(static=True, default=64)

    def __check_init__(self):
        _check_step_size("inner_lr", self.inner_lr)
        _check_step_size("outer_lr", self.outer_lr)
        _check_batch_size("batch_size", self.batch_size)
        _check_batch_size("outer_batch_size", self.outer_batch_size)

    def _directions(self, outer_loss, inner_loss, state, inner_data, outer_data, key):
        inner_key, outer_key = jax.random.split(key)
        inner_idx = _sample(inner_key, inner_data, self.batch_size, "inner_data")
        outer_idx = _sample(outer_key, outer_data, self.outer_batch_size, "outer_data")
        directions = stochastic_directions(
            outer_loss,
            inner_loss,
            state.params,
            state.v,
            state.hparams,
            _take(inner_data, inner_idx),
            _take(outer_data, outer_idx),
        )
        return directions, None


class SABA(_SingleLoop):
    r"""SABA, the Stochastic Average Bilevel Algorithm of Dagréou et al. (2022): SOBA with
    each of the five per-sample oracles ($\nabla_w L_i$, $H_i v$,
    $(\partial^2_{\lambda w} L_i)\, v$, $\nabla_w E_j$, $\partial_\lambda E_j$)
    variance-reduced as in SAGA:

    $$\hat d = \frac{1}{|B|} \sum_{i \in B} \big(d_i(\text{now}) - m_i\big)
      + \frac1n \sum_{i=1}^n m_i, \qquad m_i \leftarrow d_i(\text{now}) \text{ for } i \in B,$$

    where $m_i$ is the last value computed for sample $i$. The estimate's variance vanishes
    as the iterates converge, so SABA converges with **constant** step sizes, linearly on
    strongly convex problems. It stores one copy of each oracle per sample: memory
    $n_{inner}(2\dim w + \dim \lambda) + n_{outer}(\dim w + \dim \lambda)$. The memory starts
    at the oracles of the initial point (one pass over both data sets, in `init`).

    **Arguments:**

    - `inner_lr`, `outer_lr`: the step sizes $\rho$ and $\gamma$, floats or schedules.
    - `batch_size`, `outer_batch_size`: samples per step.
    - `init_chunk`: how many samples `init` evaluates at once (bounds its memory).
    """

    inner_lr: StepSize
    outer_lr: StepSize
    batch_size: int | None = eqx.field(static=True, default=64)
    outer_batch_size: int | None = eqx.field(static=True, default=64)
    init_chunk: int = eqx.field(static=True, default=1024)

    has_memory: ClassVar[bool] = True

    def __check_init__(self):
        _check_step_size("inner_lr", self.inner_lr)
        _check_step_size("outer_lr", self.outer_lr)
        _check_batch_size("batch_size", self.batch_size)
        _check_batch_size("outer_batch_size", self.outer_batch_size)
        check_int("init_chunk", self.init_chunk, 1)

    # Each step's batch is drawn one step ahead (at `init`, then at the end of the previous
    # step, with that step's key), and its stored values are read right after the table is
    # written. Reading the table *before* writing it in the same step makes XLA copy the
    # whole table, O(n) per step (15 ms instead of 0.3 ms at n = 20 000, d = 50).
    def _init_memory(self, outer_loss, inner_loss, params, v, hparams, inner_data, outer_data, key):
        n_inner = num_samples(inner_data, "inner_data")
        n_outer = num_samples(outer_data, "outer_data")
        chunk = self.init_chunk
        iterates = (params, v, hparams)
        inner = _per_sample_inner(inner_loss, *iterates, inner_data, jnp.arange(n_inner), chunk)
        outer = _per_sample_outer(
            outer_loss, params, hparams, outer_data, jnp.arange(n_outer), chunk
        )
        mean = lambda tree: jax.tree.map(lambda a: jnp.mean(a, axis=0), tree)
        memory = {"inner": inner, "outer": outer}
        memory.update(inner_mean=mean(inner), outer_mean=mean(outer))
        memory.update(self._next_batch(memory, inner_data, outer_data, key))
        return memory

    def _next_batch(self, memory, inner_data, outer_data, key):
        inner_key, outer_key = jax.random.split(key)
        inner_idx = _sample(inner_key, inner_data, self.batch_size, "inner_data")
        outer_idx = _sample(outer_key, outer_data, self.outer_batch_size, "outer_data")
        return {
            "inner_idx": inner_idx,
            "outer_idx": outer_idx,
            "inner_old": jax.tree.map(lambda t: t[inner_idx], memory["inner"]),
            "outer_old": jax.tree.map(lambda t: t[outer_idx], memory["outer"]),
        }

    def _directions(self, outer_loss, inner_loss, state, inner_data, outer_data, key):
        memory = state.memory
        inner_idx, outer_idx = memory["inner_idx"], memory["outer_idx"]
        inner = _per_sample_inner(
            inner_loss, state.params, state.v, state.hparams, inner_data, inner_idx
        )
        outer = _per_sample_outer(outer_loss, state.params, state.hparams, outer_data, outer_idx)
        inner_dir, inner_table, inner_mean = _saga(
            inner, memory["inner_old"], memory["inner"], memory["inner_mean"], inner_idx
        )
        outer_dir, outer_table, outer_mean = _saga(
            outer, memory["outer_old"], memory["outer"], memory["outer_mean"], outer_idx
        )
        directions = _combine(*inner_dir, *outer_dir)
        memory = {"inner": inner_table, "outer": outer_table}
        memory.update(inner_mean=inner_mean, outer_mean=outer_mean)
        memory.update(self._next_batch(memory, inner_data, outer_data, key))
        return directions, memory


def _saga(new, old, table, mean, idx):
    """SAGA's estimate from the batch's fresh values `new` (leading axis: the batch), their
    stored values `old = table[idx]`, and the table's mean; returns the estimate and the
    updated table and mean. An index drawn twice is stored (and enters the mean) once."""
    n = jax.tree.leaves(table)[0].shape[0]
    estimate = jax.tree.map(lambda a, b, m: jnp.mean(a - b, axis=0) + m, new, old, mean)
    # Only the first occurrence of each index writes (the others are sent out of bounds and
    # dropped), so that the mean's update knows what the table holds without reading it.
    earlier = jnp.arange(idx.shape[0])[:, None] > jnp.arange(idx.shape[0])[None, :]
    first = ~jnp.any((idx[:, None] == idx[None, :]) & earlier, axis=1)
    write_idx = jnp.where(first, idx, n)
    table = jax.tree.map(lambda t, a: t.at[write_idx].set(a, mode="drop"), table, new)

    def update_mean(m, a, b):
        keep = first.reshape((-1,) + (1,) * (a.ndim - 1))
        return m + jnp.sum(jnp.where(keep, a - b, 0), axis=0) / n

    mean = jax.tree.map(update_mean, mean, new, old)
    return estimate, table, mean


def _per_sample_inner(inner_loss, params, v, hparams, data, idx, chunk=None):
    r"""Per-sample $(\nabla_w L_i, H_i v, (\partial^2_{\lambda w} L_i)\, v)$, stacked."""

    def one(i):
        return _inner_oracles(inner_loss, params, v, hparams, _take(data, i[None]))

    return _map(one, idx, chunk)


def _per_sample_outer(outer_loss, params, hparams, data, idx, chunk=None):
    r"""Per-sample $(\nabla_w E_j, \partial_\lambda E_j)$, stacked."""

    def one(i):
        return _outer_oracles(outer_loss, params, hparams, _take(data, i[None]))

    return _map(one, idx, chunk)


def _map(fn, idx, chunk):
    if chunk is None or chunk >= idx.shape[0]:
        return jax.vmap(fn)(idx)
    return jax.lax.map(fn, idx, batch_size=chunk)


def stochastic_bilevel(
    solver: AbstractStochasticBilevel,
    outer_loss: OuterLoss,
    inner_loss: InnerLoss,
    params: Params,
    hparams: HParams,
    inner_data: Data,
    outer_data: Data,
    *,
    num_steps: int,
    key: PRNGKeyArray,
    state: StochasticState | None = None,
) -> StochasticState:
    r"""Runs `num_steps` steps of a stochastic bilevel solver ([`bilevax.contrib.SOBA`][],
    [`bilevax.contrib.SABA`][], [`bilevax.contrib.F2SA`][] or [`bilevax.contrib.BOME`][]) in
    one `lax.scan`.

    **Arguments:**

    - `solver`: the solver, an instance (`bx.contrib.SOBA(...)`, not the class).
    - `outer_loss`, `inner_loss`: `(params, hparams, batch) -> scalar`, means over the
        batch's samples.
    - `params`, `hparams`: the starting $w$ and $\lambda$, pytrees of floating-point arrays
        (ignored when `state` is given).
    - `inner_data`, `outer_data`: pytrees of arrays with a leading axis of samples.
    - `num_steps`: how many steps.
    - `key`: a JAX PRNG key. Step $t$ draws its batches from `fold_in(k, t)` with `k` a key
        split from `key`, so a run split into pieces (passing the last `state` back, with the
        same `key`) draws the same batches as one run.
    - `state`: continue from this state instead of calling `solver.init`.

    **Returns:**

    The final [`bilevax.contrib.StochasticState`][]. Check its `result`: a run whose iterates
    became non-finite (a step size too large, NaN data) ends with `RESULTS.nonfinite` and NaN
    iterates.
    """
    check_instance(
        "solver",
        solver,
        AbstractStochasticBilevel,
        "a solver instance: `bx.contrib.SOBA(...)`, `SABA(...)`, `F2SA(...)` or `BOME(...)`",
    )
    check_int("num_steps", num_steps, 0)
    init_key, key = jax.random.split(key)
    if state is None:
        state = solver.init(
            outer_loss, inner_loss, params, hparams, inner_data, outer_data, key=init_key
        )
    else:
        _check(outer_loss, inner_loss, state.params, state.hparams, inner_data, outer_data)

    def body(state, _):
        step_key = jax.random.fold_in(key, state.num_steps)
        state = solver.step(outer_loss, inner_loss, state, inner_data, outer_data, step_key)
        return state, None

    state, _ = jax.lax.scan(body, state, length=num_steps)
    return state


def num_samples(data: Data, name: str) -> int:
    """The common leading dimension of every array in `data`."""
    leaves = jax.tree.leaves(data)
    if not leaves or not all(hasattr(x, "shape") and jnp.ndim(x) >= 1 for x in leaves):
        raise ValueError(
            f"`{name}` must be a pytree of arrays with a leading axis of samples, got {data!r}."
        )
    sizes = {x.shape[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"every array in `{name}` must have the same number of samples (leading axis); "
            f"got leading sizes {sorted(sizes)}."
        )
    return sizes.pop()


def _sample(key, data, batch_size, name):
    n = num_samples(data, name)
    if batch_size is None:
        return jnp.arange(n)
    return jax.random.randint(key, (batch_size,), 0, n)


def _take(data, idx):
    return jax.tree.map(lambda a: a[idx], data)


def _step_size(lr: StepSize, step):
    return lr(step) if callable(lr) else lr


def _check_step_size(name, value):
    """A positive step size, or a schedule `step -> step size` (called at each step)."""
    if not callable(value):
        check_real(name, value, lower=0, lower_open=True)


def _check_batch_size(name, value):
    if value is not None:
        check_int(name, value, 1)


def _check(outer_loss, inner_loss, params, hparams, inner_data, outer_data):
    check_callable("outer_loss", outer_loss)
    check_callable("inner_loss", inner_loss)
    for name, tree in (("params", params), ("hparams", hparams)):
        # Every leaf takes gradient steps, so every leaf must be a floating-point array: an
        # integer has no gradient, and a Python float would come back an array.
        leaves = jax.tree.leaves(tree)
        if not leaves or not all(eqx.is_inexact_array(x) for x in leaves):
            raise TypeError(
                f"`{name}` must be a pytree of floating-point JAX arrays, every leaf of which "
                f"is optimised (e.g. `jnp.zeros(d)`, `jnp.asarray(1.0)`); got {_describe(tree)}."
            )
    num_samples(inner_data, "inner_data")
    num_samples(outer_data, "outer_data")
    check_scalar_loss("inner_loss", inner_loss, params, hparams, inner_data, "params")
    check_scalar_loss("outer_loss", outer_loss, params, hparams, outer_data, "params")
