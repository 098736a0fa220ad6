r"""The three self-tuning-network variants as losses and gradients of one layer family.

A model is used through a per-example function `apply(model, x, h, lam, key, train)`: `h` is
the hypernetwork input (what the STN layers' bottlenecks see), `lam` the hyperparameters in
their ranges as the training side uses them (dropout rates, augmentation strengths), `key`
the example's randomness (or `None` in eval mode). The variants differ in `h` and in how the
weights are trained:

- `"stn"`: $h = \lambda + \delta$; all weights trained on the perturbed loss.
- `"centred"`: $h = \lambda + \delta - \lambda_0$; all weights trained on the perturbed loss.
- `"delta"`: $h = \lambda + \delta - \lambda_0$; the general weights trained on the
  $\delta = 0$ prediction, the response weights on the prediction linearised in $\delta$,
  both from one JVP.

(hyperparameters in their unconstrained coordinates; $\lambda_0$ is the current value with
its gradient stopped).
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._linearize import linearized_response, skip_zero_products
from ._hyperparameters import HyperParameters
from ._stn_layers import response_filter


VARIANTS = ("stn", "centred", "delta")


def _check_variant(variant) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")


def _batch_size(x) -> int:
    leaves = jax.tree.leaves(x)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError("`x` must be a batch: arrays with a leading batch axis.")
    return leaves[0].shape[0]


def _check_apply(apply: Callable, model, hparams: HyperParameters, x) -> None:
    """Traces `apply` on the first example of `x` (no FLOPs), re-raising a failure with the
    arguments named: a batch of the wrong rank (a 1-D `x` for a model of vectors) otherwise
    fails deep inside the model with JAX's message."""
    example = jax.tree.map(lambda a: a[0], x)
    h, lam = jnp.zeros_like(hparams.values), hparams.value(train=True)
    try:
        eqx.filter_eval_shape(apply, model, example, h, lam, None, False)
    except Exception as error:
        shapes = jax.tree.map(jnp.shape, x)
        raise ValueError(
            f"calling `apply(model, x[i], h, lam, key, train)` on one example of `x` (a batch "
            f"of shape {shapes}) failed: `x` must hold a leading batch axis of the examples "
            f"`apply` takes. The error was: {error}"
        ) from error


def eval_input(variant: str, hparams: HyperParameters) -> jax.Array:
    """The hypernetwork input at the current hyperparameters (no perturbation): $\\lambda$ for
    the STN, zero for the centred variants."""
    _check_variant(variant)
    if variant == "stn":
        return hparams.values
    return jnp.zeros_like(hparams.values)


def predict(variant: str, apply: Callable, model, hparams: HyperParameters, x):
    """Eval-mode predictions (no dropout, no augmentation, no perturbation) on a batch `x`,
    with the general weights for the centred variants."""
    _batch_size(x)
    _check_apply(apply, model, hparams, x)
    h = eval_input(variant, hparams)
    lam = hparams.value(train=True)
    return jax.vmap(lambda xi: apply(model, xi, h, lam, None, False))(x)


def weight_grads(
    variant: str,
    apply: Callable,
    loss: Callable,
    model,
    hparams: HyperParameters,
    x,
    y,
    key,
    *,
    decouple: bool = True,
):
    r"""The loss and gradient of one weight step on a batch, perturbation per example.

    **Arguments:**

    - `variant`: `"stn"`, `"centred"` or `"delta"` (see the module's table).
    - `apply`: `(model, x, h, lam, key, train) -> out` on one example.
    - `loss`: `(out, y, lam) -> scalar` on one example: the training loss, which may use the
        hyperparameters directly (an L2 strength).
    - `model`: the network (STN layers inside).
    - `hparams`: a [`bilevax.nn.HyperParameters`][]; not differentiated here.
    - `x`, `y`: a batch (leading axis).
    - `key`: draws the perturbations and the examples' keys.
    - `decouple`: Δ-STN only. `True`: the general weights get the gradient of the $\delta = 0$
        loss only and the response weights that of the linearised loss (two pullbacks of one
        JVP, costing one plain backward and one backward of the response weights). `False`:
        one pullback of their sum, so that the general weights also see the linearised loss
        (the extra term has zero mean in $\delta$ to first order); dearer than `True`, as the
        general weights' gradient then also runs through the tangent.

    **Returns:**

    `(loss_value, grads)`, `grads` with the structure of `model`. For Δ-STN `loss_value` is
    the $\delta = 0$ training loss.
    """
    _check_variant(variant)
    batch = _batch_size(x)
    _check_apply(apply, model, hparams, x)
    hparams = jax.lax.stop_gradient(hparams)
    key_delta, key_examples = jax.random.split(key)
    delta = hparams.perturbation(key_delta, batch)
    u = hparams.values
    lam_pert = hparams.constrain(u + delta, train=True)
    keys = jax.random.split(key_examples, batch)
    mean_loss = lambda out, lam: jnp.mean(jax.vmap(loss)(out, y, lam))

    if variant in ("stn", "centred"):
        h = u + delta if variant == "stn" else delta

        def full(m):
            out = jax.vmap(apply, in_axes=(None, 0, 0, 0, 0, None))(m, x, h, lam_pert, keys, True)
            return mean_loss(out, lam_pert)

        return eqx.filter_value_and_grad(full)(model)

    lam_now = jnp.broadcast_to(hparams.value(train=True), lam_pert.shape)
    params, rest = eqx.partition(model, eqx.is_inexact_array)

    # At h = 0 the bottlenecks' outputs H h are zero, and with them the tangent's (H h) ⊙ V ẋ,
    # the pullbacks' paths through H h and those of the zero cotangents that decouple them:
    # about as many flops as the step needs (see `experiments/benchmarks/delta_stn_step.py`).
    @skip_zero_products
    def value_and_grads(params, delta, lam_pert, lam_now, keys):
        def both(p):
            m = eqx.combine(p, rest)

            def one(xi, di, lam_i, key_i):
                fn = lambda h: apply(m, xi, h, lam_i, key_i, True)
                return linearized_response(fn, jnp.zeros_like(di), di)

            return jax.vmap(one)(x, delta, lam_pert, keys)

        (out, out_lin), pullback = jax.vjp(both, params)
        value, cot_out = jax.value_and_grad(mean_loss)(out, lam_now)
        cot_lin = jax.grad(mean_loss)(out_lin, lam_pert)
        if not decouple:
            (grads,) = pullback((cot_out, cot_lin))
            return value, grads
        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
        (grads_general,) = pullback((cot_out, zeros(cot_lin)))
        (grads_response,) = pullback((zeros(cot_out), cot_lin))
        is_response = response_filter(grads_general)
        grads = jax.tree.map(
            lambda r, g, s: s if r else g,
            is_response,
            grads_general,
            grads_response,
            is_leaf=lambda t: t is None,
        )
        return value, grads

    return value_and_grads(params, delta, lam_pert, lam_now, keys)


def hyper_loss(
    variant: str,
    apply: Callable,
    loss: Callable,
    model,
    hparams: HyperParameters,
    x,
    y,
    key,
    *,
    entropy_weight: float = 1e-3,
    centre=None,
):
    r"""The hyper step's objective on a validation batch: the eval-mode validation loss of
    the best-response approximation at per-example perturbed hyperparameters, minus
    `entropy_weight` times the perturbation entropy. Differentiate it with respect to
    `hparams` (values and scales).

    The hyperparameters reach the loss only through the hypernetwork input $h$: the training
    side's `lam` (dropout rates, augmentation) is passed with its gradient stopped, as eval
    mode does not use it. For Δ-STN the prediction is linearised in $h$ around $h = 0$.

    **Arguments:**

    - `loss`: `(out, y) -> scalar` on one example: the validation loss.
    - `centre`: the centre $\lambda_0$ of the centred variants (unconstrained); by default
        the current values with their gradient stopped, so that the hypergradient flows
        through $\lambda - \lambda_0$ only.
    - the others as [`bilevax.nn.weight_grads`][].

    **Returns:**

    A scalar.
    """
    _check_variant(variant)
    batch = _batch_size(x)
    _check_apply(apply, model, hparams, x)
    model = jax.lax.stop_gradient(model)
    delta = hparams.perturbation(key, batch)
    u = hparams.values
    lam = jax.lax.stop_gradient(hparams.constrain(u + delta, train=True))
    centre = jax.lax.stop_gradient(u) if centre is None else centre
    h = u + delta if variant == "stn" else u + delta - centre

    if variant == "delta":
        # As in `weight_grads`, the tangent's products with H h = 0 are skipped, and with them
        # their transposes in the hypergradient.
        @skip_zero_products
        def linearised(h):
            def one(xi, hi, lam_i):
                fn = lambda hh: apply(model, xi, hh, lam_i, None, False)
                return linearized_response(fn, jnp.zeros_like(hi), hi)[1]

            return jax.vmap(one)(x, h, lam)

        out = linearised(h)
    else:
        out = jax.vmap(apply, in_axes=(None, 0, 0, 0, None, None))(model, x, h, lam, None, False)
    value = jnp.mean(jax.vmap(loss)(out, y))
    return value - entropy_weight * hparams.entropy()
