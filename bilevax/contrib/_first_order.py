r"""First-order (Hessian-free) bilevel methods: F2SA (Kwon et al. 2023) and BOME (Ye et al.
2022).

Both replace the adjoint of the implicit hypergradient by a **value-function** view of the
inner problem: $w$ is optimal for $L(\cdot, \lambda)$ exactly when
$q(w, \lambda) = L(w, \lambda) - \min_u L(u, \lambda) \le 0$, and the gradient of the value
$\min_u L(u, \lambda)$ is $\partial_\lambda L(u^*, \lambda)$ at its minimiser (Danskin), a
first derivative. So each method needs gradients of $L$ and $E$ only, never a Hessian-vector
product: they suit an inner trainer that is a black box with a gradient, or where an HVP costs
more than a few more gradients. Both run on the driver, state and failure channel of SOBA and
SABA ([`bilevax.contrib.stochastic_bilevel`][], [`bilevax.contrib.StochasticState`][]).
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike

from .._checks import check_int, check_real
from ._stochastic import (
    AbstractStochasticBilevel,
    StepSize,
    _check_batch_size,
    _check_step_size,
    _move,
    _sample,
    _step_size,
    _take,
)


def _batches(solver, key, inner_data, outer_data):
    inner_key, outer_key = jax.random.split(key)
    inner = _take(inner_data, _sample(inner_key, inner_data, solver.batch_size, "inner_data"))
    outer = _take(outer_data, _sample(outer_key, outer_data, solver.outer_batch_size, "outer_data"))
    return inner, outer


def _add(a, b, scale: ArrayLike = 1.0):
    """`a + scale * b`, leaf by leaf, `scale` cast to each leaf's dtype."""
    return jax.tree.map(lambda x, y: x + jnp.asarray(scale).astype(x.dtype) * y, a, b)


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class F2SA(AbstractStochasticBilevel):
    r"""F2SA, the Fully First-order Stochastic Approximation of Kwon, Kwon, Wright and Nowak
    (ICML 2023). With a penalty $\sigma > 0$ it minimises over $\lambda$ the penalised value

    $$\mathcal L_\sigma(\lambda) = \min_y \big[E(y, \lambda) + \sigma L(y, \lambda)\big]
      - \sigma \min_z L(z, \lambda),$$

    whose gradient (Danskin, at the two minimisers $y_\sigma$ and $z = w^*$) is
    $\partial_\lambda E(y_\sigma) + \sigma\big(\partial_\lambda L(y_\sigma)
    - \partial_\lambda L(z)\big)$: first derivatives only. Since
    $y_\sigma = w^* - H^{-1}\nabla_w E/\sigma + O(\sigma^{-2})$, it is the implicit
    hypergradient up to $O(1/\sigma)$, and the penalty grows along the run to remove that
    bias. Each step, on fresh mini-batches (one inner and one outer batch per inner step,
    shared by $y$ and $z$, and one pair for $\lambda$):

    $$\begin{aligned}
      &\text{repeat } T \text{ times:}\quad z \leftarrow z - \rho_t \nabla_w L(z), \quad
        y \leftarrow y - \rho_t \big(\nabla_w L(y) + \nabla_w E(y) / \sigma_t\big), \\
      &\lambda \leftarrow \lambda - \gamma_t \big(\partial_\lambda E(y)
        + \sigma_t (\partial_\lambda L(y) - \partial_\lambda L(z))\big).
    \end{aligned}$$

    In the paper's notation ($x = \lambda$, $f = E$, $g = L$, multiplier
    $\lambda_k = \sigma_t$) its steps are $\gamma_k = \rho_t$ for $z$, $\alpha_k = \rho_t /
    \sigma_t$ for $y$ (so that $y$'s step is stable for the step that suits $z$, whatever the
    penalty) and $\xi\alpha_k = \gamma_t$ for $x$. Per step: $2(T + 1)$ gradients of $L$ and
    $T + 1$ of $E$ per sample of a batch, no second derivative.

    The state's `params` is $z$ (the estimate of $w^*(\lambda)$), its `memory` $y$; there is
    no adjoint (`v` is `None`). With constant $\rho$, $\gamma$, $\sigma$ and full batches,
    F2SA converges to the minimiser of $\mathcal L_\sigma$, within $O(1/\sigma)$ of the
    bilevel solution; with mini-batches the $\sigma$-scaled difference of two stochastic
    gradients has a variance that grows with $\sigma$, so Kwon et al. pair a slowly growing
    penalty with decreasing steps.

    **Arguments:**

    - `inner_lr`: $\rho$, the step of $z$ and $y$: a float or a schedule `step -> float`.
    - `outer_lr`: $\gamma$, the step of $\lambda$, likewise.
    - `penalty`: $\sigma$, a float or a schedule `step -> float` (increasing, e.g.
        `lambda t: 10.0 * (1 + t / 100) ** 0.5`).
    - `inner_steps`: $T$, the steps of $y$ and $z$ per step of $\lambda$.
    - `batch_size`: inner samples per oracle; `None` uses all of them (deterministic).
    - `outer_batch_size`: outer samples per oracle; `None` uses all of them.
    """

    inner_lr: StepSize
    outer_lr: StepSize
    penalty: StepSize
    inner_steps: int = eqx.field(static=True, default=1)
    batch_size: int | None = eqx.field(static=True, default=64)
    outer_batch_size: int | None = eqx.field(static=True, default=64)

    has_memory: ClassVar[bool] = True
    memory_is_iterate: ClassVar[bool] = True
    has_adjoint: ClassVar[bool] = False

    def __check_init__(self):
        _check_step_size("inner_lr", self.inner_lr)
        _check_step_size("outer_lr", self.outer_lr)
        _check_step_size("penalty", self.penalty)
        check_int("inner_steps", self.inner_steps, 1)
        _check_batch_size("batch_size", self.batch_size)
        _check_batch_size("outer_batch_size", self.outer_batch_size)

    def _init_memory(self, outer_loss, inner_loss, params, v, hparams, inner_data, outer_data, key):
        del outer_loss, inner_loss, v, hparams, inner_data, outer_data, key
        return params  # y starts where z does

    def _update(self, outer_loss, inner_loss, state, inner_data, outer_data, key):
        rho = _step_size(self.inner_lr, state.num_steps)
        gamma = _step_size(self.outer_lr, state.num_steps)
        sigma = _step_size(self.penalty, state.num_steps)
        lam = state.hparams
        grad_inner = jax.grad(inner_loss)
        grad_outer = jax.grad(outer_loss)
        inner_keys = jax.random.split(key, self.inner_steps + 1)

        def inner_step(carry, step_key):
            z, y = carry
            inner_batch, outer_batch = _batches(self, step_key, inner_data, outer_data)
            z = _move(z, grad_inner(z, lam, inner_batch), rho)
            y_direction = _add(
                grad_inner(y, lam, inner_batch),
                grad_outer(y, lam, outer_batch),
                1.0 / jnp.asarray(sigma),
            )
            return (z, _move(y, y_direction, rho)), None

        (z, y), _ = jax.lax.scan(inner_step, (state.params, state.memory), inner_keys[:-1])
        inner_batch, outer_batch = _batches(self, inner_keys[-1], inner_data, outer_data)
        grad_lam = lambda loss, w, batch: jax.grad(loss, argnums=1)(w, lam, batch)
        # The same inner batch at y and z: the difference of one sample's gradients at two
        # nearby points, whose variance is far below that of two independent draws.
        gap = jax.tree.map(
            jnp.subtract,
            grad_lam(inner_loss, y, inner_batch),
            grad_lam(inner_loss, z, inner_batch),
        )
        direction = _add(grad_lam(outer_loss, y, outer_batch), gap, sigma)
        return z, None, _move(lam, direction, gamma), y

    def evaluations_per_step(self, inner_data, outer_data) -> dict[str, int]:
        b_in, b_out = self.samples_per_step(inner_data, outer_data)
        calls = self.inner_steps + 1
        return {
            "inner_gradients": 2 * calls * b_in,
            "inner_second_order": 0,
            "outer_gradients": calls * b_out,
        }


class BOME(AbstractStochasticBilevel):
    r"""BOME, Bilevel Optimization Made Easy (Ye, Liu, Wright, Stone and Liu, NeurIPS 2022):
    gradient descent on $(w, \lambda)$ jointly for $E$ under the constraint
    $\hat q(w, \lambda) = L(w, \lambda) - L(\theta_T, \lambda) \le 0$, where $\theta_T$ is
    $T$ gradient steps on $L(\cdot, \lambda)$ from $w$ (a constant: not differentiated), by a
    dynamic barrier. Each step, on one inner and one outer mini-batch:

    $$\begin{aligned}
      &\theta_0 = w, \quad \theta_{s+1} = \theta_s - \alpha_t \nabla_w L(\theta_s), \qquad
        \nabla \hat q = \big(\nabla_w L(w),\ \partial_\lambda L(w) -
        \partial_\lambda L(\theta_T)\big), \\
      &\phi = \max\Big(\frac{\eta \|\nabla\hat q\|^2 - \langle \nabla E, \nabla \hat q
        \rangle}{\|\nabla \hat q\|^2},\ 0\Big), \qquad d = \nabla E + \phi\, \nabla \hat q,
        \qquad w \leftarrow w - \xi_t d_w, \quad \lambda \leftarrow \lambda - \gamma_t
        d_\lambda,
    \end{aligned}$$

    with gradients $\nabla = (\nabla_w, \partial_\lambda)$ and $\phi = 0$ where
    $\nabla \hat q = 0$. The choice of $\phi$ makes $\langle d, \nabla\hat q\rangle \ge
    \eta\|\nabla\hat q\|^2$: $d$ decreases $\hat q$ at least at rate $\eta$ and otherwise
    follows $\nabla E$ as closely as it can. The paper moves $(w, \lambda)$ with one step
    ($\xi = \gamma$, the default); a separate step $\xi$ for $w$, as in the authors' and
    benchopt's code, suits problems whose hypergradient is on another scale than $\nabla_w
    E$.
    Per step: $T + 2$ gradients of $L$ per sample of the inner batch and one of $E$ per
    sample of the outer batch, no second derivative.

    BOME's answer is approximate by design. With $\eta > 0$, $d$ vanishes nowhere off the
    constraint ($d = 0$ would need $\phi = \eta + \phi$), so with a constant step the
    iterates end on a cycle about it whose size is proportional to the step (on
    `tests/core/test_first_order.py`'s quadratic, $w^*(\lambda)$ is missed by about
    $2.4\,\xi$): decrease the steps to converge. And $\theta_T$ is not $w^*$: the
    hyperparameters are biased unless $T\alpha$ times the inner problem's curvature is
    large. The analysis (and the reference code) is deterministic. With mini-batches (one
    inner batch per step, for $\theta$'s steps and $\nabla\hat q$) $\theta_T$ minimises the
    batch's loss and $\phi$ is a ratio of estimates: BOME is biased, the less the larger the
    batches (on the test quadratic, 50% from $\lambda^*$ with batches of 8, 23% with 64,
    0.2% with full batches).

    The state's `params` is $w$; there is no adjoint (`v` is `None`) and no memory.

    **Arguments:**

    - `inner_lr`: $\alpha$, the step of the $T$ steps of $\theta$: a float or a schedule
        `step -> float`.
    - `outer_lr`: $\gamma$, the step of $\lambda$ (and of $w$ unless `params_lr` is
        given), likewise.
    - `eta`: $\eta > 0$, the barrier's rate (the paper's default 0.5).
    - `inner_steps`: $T$, the gradient steps of $\theta$ per step.
    - `params_lr`: $\xi$, the step of $w$ along $d_w$; `None` (the default) uses
        `outer_lr`, the paper's joint step.
    - `batch_size`: inner samples per step; `None` uses all of them (deterministic).
    - `outer_batch_size`: outer samples per step; `None` uses all of them.
    """

    inner_lr: StepSize
    outer_lr: StepSize
    eta: float = 0.5
    inner_steps: int = eqx.field(static=True, default=10)
    params_lr: StepSize | None = None
    batch_size: int | None = eqx.field(static=True, default=64)
    outer_batch_size: int | None = eqx.field(static=True, default=64)

    has_adjoint: ClassVar[bool] = False

    def __check_init__(self):
        _check_step_size("inner_lr", self.inner_lr)
        _check_step_size("outer_lr", self.outer_lr)
        check_real("eta", self.eta, lower=0, lower_open=True)
        check_int("inner_steps", self.inner_steps, 1)
        if self.params_lr is not None:
            _check_step_size("params_lr", self.params_lr)
        _check_batch_size("batch_size", self.batch_size)
        _check_batch_size("outer_batch_size", self.outer_batch_size)

    def _update(self, outer_loss, inner_loss, state, inner_data, outer_data, key):
        alpha = _step_size(self.inner_lr, state.num_steps)
        gamma = _step_size(self.outer_lr, state.num_steps)
        params_lr = self.outer_lr if self.params_lr is None else self.params_lr
        xi = _step_size(params_lr, state.num_steps)
        w, lam = state.params, state.hparams
        inner_batch, outer_batch = _batches(self, key, inner_data, outer_data)
        grad_inner = jax.grad(inner_loss)

        def theta_step(theta, _):
            return _move(theta, grad_inner(theta, lam, inner_batch), alpha), None

        theta, _ = jax.lax.scan(theta_step, w, length=self.inner_steps)
        q_w, q_lam = jax.grad(inner_loss, argnums=(0, 1))(w, lam, inner_batch)
        q_lam = jax.tree.map(
            jnp.subtract, q_lam, jax.grad(inner_loss, argnums=1)(theta, lam, inner_batch)
        )
        grad_q = (q_w, q_lam)
        grad_e = jax.grad(outer_loss, argnums=(0, 1))(w, lam, outer_batch)
        norm2 = _vdot(grad_q, grad_q)
        positive = norm2 > 0
        # At ∇q̂ = 0 the barrier term vanishes whatever φ is; a NaN ∇q̂ fails `positive` and
        # still makes d NaN through φ ∇q̂ = 0 · NaN.
        phi = jnp.where(
            positive,
            jnp.maximum(self.eta - _vdot(grad_e, grad_q) / jnp.where(positive, norm2, 1), 0),
            0,
        )
        d_w, d_lam = _add(grad_e, grad_q, phi)
        return _move(w, d_w, xi), None, _move(lam, d_lam, gamma), None

    def evaluations_per_step(self, inner_data, outer_data) -> dict[str, int]:
        b_in, b_out = self.samples_per_step(inner_data, outer_data)
        return {
            "inner_gradients": (self.inner_steps + 2) * b_in,
            "inner_second_order": 0,
            "outer_gradients": b_out,
        }
