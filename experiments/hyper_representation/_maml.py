r"""Whole-network adaptation heads: MAML (Finn et al. 2017), first-order MAML, and iMAML
(Rajeswaran et al. 2019).

Here the conv net is not a fixed representation: per episode, all of it (convolutions, batch
norm's scales and offsets) and a linear softmax head on its features, together $\phi$, are
adapted on the support set from the meta-learned initialisation $\theta$ (the model's `net`,
and a head of zeros: the head's classes are new in every episode, so a learned head
initialisation would only learn a bias towards some label indices (Kao et al. 2022, "the
zeroing trick")).

- MAML: $T$ SGD steps $\phi_{t+1} = \phi_t - \alpha \nabla L_S(\phi_t)$ from $\theta$, the
  query loss $L_Q(\phi_T)$ differentiated through the steps (second order: Hessian-vector
  products of $L_S$). First-order MAML drops the inner Jacobian: the gradients of the steps
  are constants, so $\mathrm{d}\phi_T/\mathrm{d}\theta = I$ and the meta-gradient is
  $\nabla L_Q(\phi_T)$.
- iMAML: $\phi^*(\theta) = \arg\min_\phi L_S(\phi) + \tfrac\lambda2\|\phi - \theta\|^2$,
  approximated by $T$ SGD steps from $\theta$ (`bilevax.inner_solve`), its meta-gradient by
  the implicit function theorem (`bilevax.ImplicitAdjoint`):
  $\mathrm{d}\phi^*/\mathrm{d}\theta = (I + H/\lambda)^{-1}$ with $H = \nabla^2 L_S(\phi^*)$,
  so the meta-gradient is $(I + H/\lambda)^{-1}\nabla L_Q(\phi^*)$, one linear solve with
  $H + \lambda I$ per episode, independent of how $\phi^*$ was reached.

Batch norm: the support loss runs the net on the support images alone (the only labelled
data), and the query loss runs the adapted net on the queries alone, each with its own batch
statistics, as in Finn et al.'s MAML.
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float, Int

import bilevax as bx

from ._model import ConvNet


# How iMAML's linear system $(H + \lambda I)x = g$ is solved, each with a fixed budget of
# `imaml_cg_steps` iterations (tolerance zero: the iMAML recipe is a few steps, not a
# tolerance). "cg" is bilevax's default solver; it breaks down when $H + \lambda I$ is
# indefinite, as it is after a few SGD steps (docs/hyper-representation.md). "normal_cg"
# (torchopt's `solve_normal_cg`) runs CG on the normal equations, which are positive definite
# whenever the system is non-singular; "gmres" needs no definiteness either.
LINEAR_SOLVERS = ("normal_cg", "gmres", "cg")


def linear_solver(name: str, steps: int) -> lx.AbstractLinearSolver:
    """The lineax solver called `name` (one of `LINEAR_SOLVERS`), running `steps` iterations."""
    if name == "cg":
        return bx.CG(rtol=0.0, atol=0.0, max_steps=steps)
    if name == "normal_cg":
        return lx.Normal(bx.CG(rtol=0.0, atol=0.0, max_steps=steps))
    if name == "gmres":
        # One restart cycle of `steps` Krylov vectors: the same budget, `steps` products. A
        # tolerance of zero would make lineax call an exact solve in fewer steps "stagnation"
        # (a failure: NaN); 1e-12 is out of float32's reach, so there the budget stops it.
        return lx.GMRES(rtol=1e-12, atol=1e-12, max_steps=steps, restart=steps)
    raise ValueError(f"`linear_solver` must be one of {LINEAR_SOLVERS}, got {name!r}.")


class Adapted(eqx.Module):
    """What MAML and iMAML adapt per episode: the whole conv net and a linear softmax head."""

    net: ConvNet
    weight: Float[Array, "d n"]
    bias: Float[Array, " n"]

    def __call__(self, images: Float[Array, "m s s 1"]) -> Float[Array, "m n"]:
        return self.net(images) @ self.weight + self.bias


def initial(net: ConvNet, feature_dim: int, n_way: int) -> Adapted:
    """$\\theta$: the meta-learned net and a zero head."""
    dtype = net.blocks[0].weight.dtype
    return Adapted(net, jnp.zeros((feature_dim, n_way), dtype), jnp.zeros(n_way, dtype))


def _cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def support_loss(phi: Adapted, images, labels) -> Float[Array, ""]:
    """$L_S(\\phi)$: the support cross-entropy."""
    return _cross_entropy(phi(images), labels)


def maml_adapt(
    theta: Adapted,
    support,
    support_labels: Int[Array, " nk"],
    *,
    inner_lr: float,
    num_steps: int,
    first_order: bool = False,
) -> Adapted:
    r"""$\phi_T$: `num_steps` SGD steps of size `inner_lr` on the support loss from `theta`,
    differentiable through the steps with respect to `theta` (with `first_order`, the step
    gradients are constants: $\mathrm{d}\phi_T/\mathrm{d}\theta = I$)."""
    params, static = eqx.partition(theta, eqx.is_inexact_array)
    loss = lambda p: support_loss(eqx.combine(p, static), support, support_labels)

    def step(p, _):
        g = jax.grad(loss)(p)
        if first_order:
            g = jax.lax.stop_gradient(g)
        return jax.tree.map(lambda x, gx: x - inner_lr * gx, p, g), None

    params, _ = jax.lax.scan(step, params, None, length=num_steps)
    return eqx.combine(params, static)


def _proximal_loss(params, theta, data):
    r"""$L_S(\phi) + \tfrac\lambda2\|\phi - \theta\|^2$ (`data` = static part, images,
    labels, $\lambda$)."""
    static, images, labels, lam = data
    distance = sum(
        jnp.sum(jnp.square(p - t)) for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(theta))
    )
    return support_loss(eqx.combine(params, static), images, labels) + 0.5 * lam * distance


def imaml_adapt(
    theta: Adapted,
    support,
    support_labels: Int[Array, " nk"],
    *,
    lam: float,
    inner_lr: float,
    num_steps: int,
    tol: float = 0.0,
    solver: lx.AbstractLinearSolver,
) -> Adapted:
    r"""$\phi^*$: the proximal support loss minimised from `theta` by SGD of size `inner_lr`
    until its gradient norm is `tol` or for `num_steps` steps, differentiated with respect to
    `theta` by the implicit function theorem with the linear solver `solver`.

    A solve stopped by `num_steps` (the iMAML recipe: a fixed budget) is differentiated as if
    it were the minimiser, and so is a linear solve cut short at its budget: the adjoint does
    not raise for either (`throw=False`). A linear solve that breaks down (CG on an indefinite
    $H + \lambda I$) or a non-finite one makes the meta-gradient NaN."""
    params, static = eqx.partition(theta, eqx.is_inexact_array)
    sol = bx.inner_solve(
        _proximal_loss,
        params,
        params,
        (static, support, support_labels, lam),
        solver=bx.GradientDescent(inner_lr),
        max_steps=num_steps,
        tol=tol,
        adjoint=bx.ImplicitAdjoint(linear_solver=solver, throw=False),
    )
    return eqx.combine(sol.params, static)


def whole_network_logits(
    net: ConvNet,
    support,
    support_labels,
    query,
    *,
    n_way: int,
    num_steps: int,
    head: Literal["maml", "fomaml", "imaml"],
    inner_lr: float,
    imaml_lambda: float = 2.0,
    imaml_tol: float = 0.0,
    imaml_solver: str = "normal_cg",
    imaml_cg_steps: int = 5,
) -> Float[Array, "nq n"]:
    """The query logits of the net and head adapted on the support set by `head`."""
    feature_dim = jax.eval_shape(net, support).shape[-1]
    theta = initial(net, feature_dim, n_way)
    if head == "imaml":
        phi = imaml_adapt(
            theta,
            support,
            support_labels,
            lam=imaml_lambda,
            inner_lr=inner_lr,
            num_steps=num_steps,
            tol=imaml_tol,
            solver=linear_solver(imaml_solver, imaml_cg_steps),
        )
    else:
        phi = maml_adapt(
            theta,
            support,
            support_labels,
            inner_lr=inner_lr,
            num_steps=num_steps,
            first_order=head == "fomaml",
        )
    return phi(query)
