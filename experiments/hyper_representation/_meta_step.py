r"""One meta-step: per episode, a linear softmax head trained by $T$ gradient steps on the
support features (`bilevax.inner_solve` with `bilevax.UnrolledAdjoint`), its query loss
differentiated in reverse mode through the steps, averaged over a meta-batch of episodes
(`jax.vmap`) that is sharded over the devices (`jax.sharding`). Two other heads share the
harness: the L2-regularised head solved to a tolerance and differentiated by the implicit
function theorem (the limit $T \to \infty$), and ProtoNet's class means.

The sharding is made in one place, [`make_mesh`][experiments.hyper_representation.make_mesh]
and [`shard_batch`][experiments.hyper_representation.shard_batch]: the meta-step itself is one
jitted function whatever the number of devices, and XLA inserts the cross-device mean of the
meta-gradient.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int

import bilevax as bx

from .._optax import optax_step
from ._maml import LINEAR_SOLVERS, whole_network_logits
from ._model import HyperRepresentation


TASKS = "tasks"  # the mesh axis the meta-batch is split over


class Batch(NamedTuple):
    """A meta-batch of `B` episodes (the device half of `experiments.data.Episodes`).

    Labels need not be class-major (Lake's runs are not), but every class `0..N-1` must have
    at least one support image.
    """

    support: Float[Array, "B nk s s 1"]
    support_labels: Int[Array, "B nk"]
    query: Float[Array, "B nq s s 1"]
    query_labels: Int[Array, "B nq"]


class TrainState(eqx.Module):
    """What a meta-step changes: the outer variable, Adam's state, and the step count."""

    model: HyperRepresentation
    opt_state: optax.OptState
    step: Int[Array, ""]


class Head(eqx.Module):
    """The inner variable: a linear softmax classifier on the features."""

    weight: Float[Array, "d n"]
    bias: Float[Array, " n"]

    def __call__(self, features: Float[Array, "m d"]) -> Float[Array, "m n"]:
        return features @ self.weight + self.bias


class AdaptOptions(eqx.Module):
    r"""The options of the whole-network heads (`"maml"`, `"fomaml"`, `"imaml"`; the other
    heads ignore them): the inner SGD step `inner_lr`, and iMAML's proximal strength
    $\lambda$ (`imaml_lambda`), the gradient norm at which its inner solve stops before its
    $T$ steps (`imaml_tol`, 0: all $T$), and its linear solver (`imaml_solver`, one of
    `"normal_cg"`, `"gmres"`, `"cg"`) with its fixed number of iterations
    (`imaml_cg_steps`).

    `episode_map` says how the meta-batch's episodes run: `"vmap"` (the default, one batched
    program) or `"map"` (`jax.lax.map`, one episode after another). With per-episode conv
    weights (the whole-network heads), `vmap` turns each convolution into a grouped
    convolution over the episodes, which XLA's CPU backend runs slower than the episodes one
    by one (docs/hyper-representation.md); on a GPU the batched program fills the device.
    Hashable: it is a static argument of the jitted meta-step."""

    inner_lr: float = 0.4
    imaml_lambda: float = 2.0
    imaml_tol: float = 0.0
    imaml_solver: str = "normal_cg"
    imaml_cg_steps: int = 5
    episode_map: str = "vmap"

    def __check_init__(self):
        if self.episode_map not in ("vmap", "map"):
            raise ValueError(f"`episode_map` must be 'vmap' or 'map', got {self.episode_map!r}.")
        if self.imaml_solver not in LINEAR_SOLVERS:
            raise ValueError(
                f"`imaml_solver` must be one of {LINEAR_SOLVERS}, got {self.imaml_solver!r}."
            )
        if not self.inner_lr > 0 or not self.imaml_lambda > 0:
            raise ValueError(
                f"`inner_lr` and `imaml_lambda` must be positive, got {self.inner_lr} and "
                f"{self.imaml_lambda}."
            )
        if self.imaml_cg_steps < 1 or self.imaml_tol < 0:
            raise ValueError(
                f"`imaml_cg_steps` must be at least 1 and `imaml_tol` non-negative, got "
                f"{self.imaml_cg_steps} and {self.imaml_tol}."
            )


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def inner_loss(head: Head, hparams: dict, labels: Int[Array, " nk"]):
    r"""Cross-entropy of the head on the support features (`hparams["features"]`), plus
    $\tfrac{\mu}{2}(\|W\|^2 + \|b\|^2)$ when `hparams` holds an L2 strength $\mu$ (`"l2"`).

    The bias is regularised too: the softmax is unchanged by adding one number to every bias,
    so without it the inner problem has no unique minimiser and its Hessian is singular."""
    loss = cross_entropy(head(hparams["features"]), labels)
    if "l2" in hparams:
        squares = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(head))
        loss = loss + 0.5 * hparams["l2"] * squares
    return loss


def head_smoothness(features: Float[Array, "m d"], l2=0.0) -> Float[Array, ""]:
    r"""$L = \tfrac12\lambda_{\max}(\tilde Z\tilde Z^\top/m) + \mu$, with $\tilde Z = [Z, 1]$ the
    features and a column of ones: a bound on the Hessian of the head's (L2-regularised)
    support loss, since a softmax's Hessian is at most $\tfrac12$. Computed exactly from the
    small $m \times m$ Gram matrix, and differentiable: the meta-gradient is that of the
    meta-objective with this step rule in it."""
    z = jnp.concatenate([features, jnp.ones((features.shape[0], 1), features.dtype)], axis=1)
    return 0.5 * jnp.linalg.eigvalsh(z @ z.T / z.shape[0])[-1] + l2


def _solver(hparams: dict) -> bx.GradientDescent:
    # The learned step size is relative to the curvature: in (0, 2), where gradient descent
    # on an L-smooth convex loss is stable, whatever the scale of the features.
    l2 = hparams.get("l2", 0.0)
    return bx.GradientDescent(hparams["step_size"] / head_smoothness(hparams["features"], l2))


def zero_head(features, n_way: int) -> Head:
    d = features.shape[-1]
    return Head(jnp.zeros((d, n_way), features.dtype), jnp.zeros(n_way, features.dtype))


def train_head(features, labels, step_size, n_way: int, num_steps: int, l2=None) -> Head:
    """$T$ = `num_steps` gradient steps from zero on the support loss (L2-regularised if `l2`
    is given), of size `step_size` / $L$ ($L$ from `head_smoothness`: `step_size` < 2 is
    stable), differentiable through the steps with respect to `features`, `step_size` and
    `l2`."""
    hparams = {"features": features, "step_size": step_size}
    if l2 is not None:
        hparams["l2"] = l2
    sol = bx.inner_solve(
        inner_loss,
        zero_head(features, n_way),
        hparams,
        labels,
        solver=_solver,
        max_steps=num_steps,
        tol=0.0,
        adjoint=bx.UnrolledAdjoint(),
    )
    return sol.params


def _accelerated_solver(hparams: dict):
    r"""Nesterov's accelerated gradient with the step and momentum of a $\mu$-strongly convex,
    $L$-smooth problem: $1/L$ and $(1 - \sqrt{\mu/L})/(1 + \sqrt{\mu/L})$, so the steps
    needed grow as $\sqrt{L/\mu}$.

    $L$ is `head_smoothness`. A method
    with a line search (BFGS, L-BFGS) stalls in float32 before a gradient norm of $10^{-4}$:
    the loss decreases it tests are below float32's resolution there."""
    mu = hparams["l2"]
    smoothness = head_smoothness(hparams["features"], mu)
    q = jnp.sqrt(mu / smoothness)
    return optax.sgd(1 / smoothness, momentum=(1 - q) / (1 + q), nesterov=True)


def solve_head(features, labels, l2, n_way: int, tol: float, max_steps: int = 5000) -> Head:
    r"""The L2-regularised head solved from zero to a gradient norm of `tol` (Nesterov's
    accelerated gradient), differentiated by the implicit function theorem
    (`bilevax.ImplicitAdjoint`, conjugate gradients on the head's Hessian) with respect to
    `features` and `l2`: the limit $T \to \infty$ of `train_head`.

    From zero rather than warm-started: every episode is a new task with new classes, so no
    earlier solution is near this one. A solve that does not reach `tol` in `max_steps`
    raises (the meta-gradient of a head that is not the minimiser would be wrong)."""
    sol = bx.inner_solve(
        inner_loss,
        zero_head(features, n_way),
        {"features": features, "l2": l2},
        labels,
        solver=_accelerated_solver,
        max_steps=max_steps,
        tol=tol,
        adjoint=bx.ImplicitAdjoint(),
        throw=True,
    )
    return sol.params


# How an episode's classifier is built on the features: a linear head trained by T gradient
# steps (the hyper-representation), the L2-regularised head solved to a tolerance and
# differentiated implicitly, or the classes' mean support features (ProtoNet).
# Or the whole net adapted per episode (`_maml.py`): MAML, first-order MAML, iMAML.
HEADS = ("linear", "implicit", "prototypes", "maml", "fomaml", "imaml")
# The implicit head's gradient norm at which its solve stops: float32 reaches 1e-5 (not always
# 1e-6); float64 (the tests) is held to 1e-10, so that finite differences can check it.
INNER_TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.float64): 1e-10}


def prototype_logits(support_features, support_labels, query_features, n_way: int):
    r"""Prototypical networks (Snell et al. 2017): logits $-\|q - c_k\|^2$, with $c_k$ the
    mean support feature of class $k$."""
    one_hot = jax.nn.one_hot(support_labels, n_way, dtype=support_features.dtype)
    prototypes = (one_hot.T @ support_features) / jnp.sum(one_hot, axis=0)[:, None]
    return -jnp.sum((query_features[:, None, :] - prototypes[None]) ** 2, axis=-1)


def episode_loss(
    model: HyperRepresentation,
    support,
    support_labels,
    query,
    query_labels,
    *,
    n_way: int,
    num_steps: int,
    head: str = "linear",
    adapt: AdaptOptions = AdaptOptions(),
):
    """The outer objective of one episode: query cross-entropy of the episode's classifier
    (`head`, one of `HEADS`, with the whole-network heads' options `adapt`), and its query
    accuracy (as aux).

    Support and query go through the net together, so batch norm uses the episode's
    statistics, and the features are computed once, outside the inner steps. The
    whole-network heads adapt the net itself, so they run it on the support and query sets
    apart (`_maml.py`)."""
    if head not in HEADS:
        raise ValueError(f"`head` must be one of {HEADS}, got {head!r}.")
    if head in ("maml", "fomaml", "imaml"):
        logits = whole_network_logits(
            model.net,
            support,
            support_labels,
            query,
            n_way=n_way,
            num_steps=num_steps,
            head=head,
            inner_lr=adapt.inner_lr,
            imaml_lambda=adapt.imaml_lambda,
            imaml_tol=adapt.imaml_tol,
            imaml_solver=adapt.imaml_solver,
            imaml_cg_steps=adapt.imaml_cg_steps,
        )
        predicted = jnp.argmax(logits, axis=1).astype(query_labels.dtype)
        accuracy = jnp.mean((predicted == query_labels).astype(logits.dtype))
        return cross_entropy(logits, query_labels), accuracy
    features = model.net(jnp.concatenate([support, query]))
    support_features, query_features = jnp.split(features, [support.shape[0]])
    if head == "prototypes":
        logits = prototype_logits(support_features, support_labels, query_features, n_way)
    elif head == "implicit":
        tol = INNER_TOL[jnp.dtype(features.dtype)]
        trained = solve_head(support_features, support_labels, model.l2(), n_way, tol)
        logits = trained(query_features)
    else:
        step_size = model.step_size()
        trained = train_head(support_features, support_labels, step_size, n_way, num_steps)
        logits = trained(query_features)
    predicted = jnp.argmax(logits, axis=1).astype(query_labels.dtype)
    accuracy = jnp.mean((predicted == query_labels).astype(logits.dtype))
    return cross_entropy(logits, query_labels), accuracy


def batch_loss(
    model,
    batch: Batch,
    *,
    n_way: int,
    num_steps: int,
    head: str = "linear",
    adapt: AdaptOptions = AdaptOptions(),
):
    """Mean episode loss over the meta-batch, and `(accuracies, losses)` per episode.

    The episodes are `jax.vmap`-ed, or with `adapt.episode_map="map"` run one after another
    (`jax.lax.map`): see `AdaptOptions`."""
    loss_fn = lambda *e: episode_loss(
        model, *e, n_way=n_way, num_steps=num_steps, head=head, adapt=adapt
    )
    if adapt.episode_map == "map":
        losses, accuracies = jax.lax.map(lambda e: loss_fn(*e), tuple(batch))
    else:
        losses, accuracies = jax.vmap(loss_fn)(*batch)
    return jnp.mean(losses), (accuracies, losses)


def make_optimizer(
    learning_rate: float = 1e-3, num_meta_steps: int = 50_000, *, warmup: int = 0
) -> optax.GradientTransformation:
    """Adam with a cosine schedule from `learning_rate` to zero over `num_meta_steps` (after an
    optional linear warm-up)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0 if warmup else learning_rate, learning_rate, warmup, max(num_meta_steps, warmup + 1)
    )
    return optax.adam(schedule)


def init_state(model: HyperRepresentation, optimizer: optax.GradientTransformation) -> TrainState:
    params = eqx.filter(model, eqx.is_inexact_array)
    return TrainState(model, optimizer.init(params), jnp.zeros((), jnp.int32))


def meta_step(
    state: TrainState,
    batch: Batch,
    *,
    optimizer: optax.GradientTransformation,
    n_way: int,
    num_steps: int,
    head: str = "linear",
    adapt: AdaptOptions = AdaptOptions(),
) -> tuple[TrainState, dict[str, Array]]:
    """One Adam step on the representation and step size with the mean meta-gradient of the
    meta-batch.

    Jit it with the static arguments bound (see `make_meta_step`); under `jax.jit` with the
    batch sharded over a mesh's `"tasks"` axis and the state replicated, each device takes its
    share of the episodes and the mean over episodes becomes a cross-device reduction.

    **Returns:**

    `(state, metrics)`, metrics `"loss"` and `"accuracy"` (means over the meta-batch, on the
    queries), `"step_size"` and `"l2"`.
    """
    params, static = eqx.partition(state.model, eqx.is_inexact_array)
    loss_fn = lambda p: batch_loss(
        eqx.combine(p, static), batch, n_way=n_way, num_steps=num_steps, head=head, adapt=adapt
    )
    (loss, (accuracies, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params, opt_state = optax_step(optimizer, grads, state.opt_state, params)
    model = eqx.combine(params, static)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(accuracies),
        "step_size": state.model.step_size(),
        "l2": state.model.l2(),
    }
    return TrainState(model, opt_state, state.step + 1), metrics


def make_meta_step(
    optimizer: optax.GradientTransformation,
    n_way: int,
    num_steps: int,
    head: str = "linear",
    adapt: AdaptOptions = AdaptOptions(),
):
    """`meta_step` with its configuration bound, jitted: `(state, batch) -> (state, metrics)`.

    The state is not donated: the run keeps the best model seen, which shares its buffers."""

    def step(state, batch):
        return meta_step(
            state,
            batch,
            optimizer=optimizer,
            n_way=n_way,
            num_steps=num_steps,
            head=head,
            adapt=adapt,
        )

    return jax.jit(step)


@eqx.filter_jit
def episode_accuracies(
    model: HyperRepresentation,
    batch: Batch,
    n_way: int,
    num_steps: int,
    head: str = "linear",
    adapt: AdaptOptions = AdaptOptions(),
) -> Float[Array, " B"]:
    """Query accuracy of each episode of `batch` (no gradient)."""
    _, (accuracies, _) = batch_loss(
        model, batch, n_way=n_way, num_steps=num_steps, head=head, adapt=adapt
    )
    return accuracies


# -- devices -----------------------------------------------------------------------------------


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-axis mesh `("tasks",)` over `devices` (default: all of `jax.devices()`)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (TASKS,))


def shard_batch(batch: Batch, mesh: jax.sharding.Mesh) -> Batch:
    """Puts a meta-batch on the mesh, its episodes split over the `"tasks"` axis.

    **Raises:**

    `ValueError` if the meta-batch does not divide evenly over the devices.
    """
    num_devices = mesh.shape[TASKS]
    size = batch.support.shape[0]
    if size % num_devices:
        raise ValueError(
            f"The meta-batch ({size} episodes) must be a multiple of the number of devices "
            f"({num_devices})."
        )
    return jax.device_put(batch, NamedSharding(mesh, P(TASKS)))


def replicate(tree, mesh: jax.sharding.Mesh):
    """Puts the state (or anything shared by all episodes) on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def to_batch(episodes) -> Batch:
    """The arrays of an `experiments.data.Episodes` that the device needs."""
    return Batch(
        np.asarray(episodes.support),
        np.asarray(episodes.support_labels, np.int32),
        np.asarray(episodes.query),
        np.asarray(episodes.query_labels, np.int32),
    )
