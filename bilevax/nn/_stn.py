r"""The three self-tuning-network variants as losses and gradients of one layer family.

A model is used through a per-example function `apply(model, x, h, lam, key, train)`: `h` is
the hypernetwork input (what the STN layers' bottlenecks see), `lam` the hyperparameters in
their ranges as the training side uses them (dropout rates, augmentation strengths), `key`
the example's randomness (or `None` in eval mode). The variants differ in `h` and in how the
weights are trained:

- `"stn"`: $h = \lambda + \delta$; all weights trained on the perturbed loss.
- `"centred"`: $h = \lambda + \delta - \lambda_0$; the general weights trained on the loss at
  $\lambda_0$ itself (no perturbation), the response weights on the perturbed loss: Δ-STN's
  step without the linearisation, the authors' ablation.
- `"delta"`: $h = \lambda + \delta - \lambda_0$; the general weights trained on the loss at
  $\lambda_0$ itself, the response weights on the prediction at $\lambda_0 + \delta$
  linearised in $\delta$ (one JVP): Algorithm 1 of Bae & Grosse (2020).

`weight_grads(..., general=...)` switches the general weights' step to bilevax's earlier
choices (see there); `hyper_loss(..., linearize=True)` linearises Δ-STN's hyper step too.

(hyperparameters in their unconstrained coordinates; $\lambda_0$ is the current value with
its gradient stopped).
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import check_bool
from .._linearize import linearized_response
from ._hyperparameters import HyperParameters
from ._stn_layers import response_filter
from ._zero_products import skip_zero_products


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


GENERAL_STEPS = ("centre", "perturbed", "coupled")


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
    general: str = "centre",
    part: str = "both",
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
    - `key`: draws the perturbations and the examples' keys (see below).
    - `general`: how the centred variants train the general weights $w_0$ (the STN ignores
        it).
        - `"centre"` (the default), as Algorithm 1 of Bae & Grosse (2020) states it and the
          authors' code runs it: $w_0$ takes the gradient of the training loss at
          $\lambda_0$ itself, $h = 0$ and the training side (dropout masks, augmentation) at
          $\lambda_0$, with no perturbation anywhere in its pass; the response weights take
          that of the loss at $\lambda_0 + \delta$, linearised in $\delta$ for Δ-STN (one
          JVP), in full for the centred STN (the reference's ablation: Δ-STN's step without
          the linearisation). Two passes, each with its own dropout masks, as in the
          reference.
        - `"perturbed"`: one pass at $\lambda_0 + \delta$ for Δ-STN: $w_0$ from its $\delta = 0$
          prediction with the training side at the perturbed $\lambda_0 + \delta$ (so $w_0$
          trains at the mean applied rate, not at $\lambda_0$'s), the response weights from
          the linearised one, two pullbacks of one JVP. For the centred STN every weight
          trains on the perturbed loss. bilevax's choice before it followed Algorithm 1.
        - `"coupled"`: as `"perturbed"`, with one pullback of the sum of the two losses, so
          that for Δ-STN $w_0$ also sees the linearised loss.

    - `part`: with `general="centre"`, which of Algorithm 1's two passes to run: `"both"`
        (the default), `"general"` ($w_0$'s pass; the response weights' gradient is zero)
        or `"response"` (the response's pass; $w_0$'s gradient is zero, and `loss_value` is
        the response's loss). The authors' code steps $w_0$ first and takes the response's
        gradient at the new $w_0$: two calls, one per part, do the same.

    The randomness: `key_delta, key_examples = jax.random.split(key)`; the perturbations are
    `hparams.perturbation(key_delta, batch)`, the examples' keys
    `jax.random.split(key_examples, batch)` (those of $w_0$'s pass with `general="centre"`),
    and the response pass's, with `general="centre"`,
    `jax.random.split(jax.random.fold_in(key_examples, 1), batch)`.

    **Returns:**

    `(loss_value, grads)`, `grads` with the structure of `model`. For the centred variants
    `loss_value` is the training loss of $w_0$'s prediction (at $\lambda_0$ with
    `general="centre"`, at $\delta = 0$ with the perturbed training side otherwise, for
    Δ-STN; the perturbed loss for the centred STN with `general="perturbed"`).
    """
    _check_variant(variant)
    if general not in GENERAL_STEPS:
        raise ValueError(f"`general` must be one of {GENERAL_STEPS}, got {general!r}.")
    if part not in ("both", "general", "response"):
        raise ValueError(f"`part` must be 'both', 'general' or 'response', got {part!r}.")
    if part != "both" and (variant == "stn" or general != "centre"):
        raise ValueError(
            "`part` splits Algorithm 1's two passes: it needs a centred variant and "
            f"`general='centre'`, got variant {variant!r} and general {general!r}."
        )
    batch = _batch_size(x)
    _check_apply(apply, model, hparams, x)
    hparams = jax.lax.stop_gradient(hparams)
    key_delta, key_examples = jax.random.split(key)
    delta = hparams.perturbation(key_delta, batch)
    u = hparams.values
    lam_pert = hparams.constrain(u + delta, train=True)
    keys = jax.random.split(key_examples, batch)
    mean_loss = lambda out, lam: jnp.mean(jax.vmap(loss)(out, y, lam))
    forward = jax.vmap(apply, in_axes=(None, 0, 0, 0, 0, None))

    if variant == "stn" or (variant == "centred" and general != "centre"):
        h = u + delta if variant == "stn" else delta

        def full(m):
            return mean_loss(forward(m, x, h, lam_pert, keys, True), lam_pert)

        return eqx.filter_value_and_grad(full)(model)

    lam_now = jnp.broadcast_to(hparams.value(train=True), lam_pert.shape)
    params, rest = eqx.partition(model, eqx.is_inexact_array)
    if general == "centre":
        keys_response = jax.random.split(jax.random.fold_in(key_examples, 1), batch)
        return _centre_step(
            variant,
            apply,
            mean_loss,
            params,
            rest,
            x,
            delta,
            lam_now,
            lam_pert,
            keys,
            keys_response,
            part,
        )
    return _perturbed_step(
        apply, mean_loss, params, rest, x, delta, lam_now, lam_pert, keys, general == "coupled"
    )


def _centre_step(
    variant, apply, mean_loss, params, rest, x, delta, lam_now, lam_pert, keys, keys_response, part
):
    """Algorithm 1's weight step: w₀ on the training loss at λ₀ (h = 0, no perturbation), the
    response weights on the loss at λ₀ + δ (linearised for Δ-STN, in full for the centred
    STN), each pass differentiated only with respect to the weights it trains."""
    response, general = eqx.partition(params, response_filter(params))
    forward = jax.vmap(apply, in_axes=(None, 0, 0, 0, 0, None))

    # At h = 0 the bottlenecks' outputs H h are zero, and with them every path through the
    # response weights: skipped, this pass costs what the plain network's step costs. (The
    # zeros are made inside, where `skip_zero_products` sees them; an argument is opaque.)
    @skip_zero_products
    def general_value_and_grads(general, response, lam_now, keys):
        def plain(g):
            m = eqx.combine(g, response, rest)
            zero_h = jnp.zeros(delta.shape, delta.dtype)
            return mean_loss(forward(m, x, zero_h, lam_now, keys, True), lam_now)

        return jax.value_and_grad(plain)(general)

    @skip_zero_products
    def response_grads(response, general, delta, lam_pert, keys):
        def perturbed(r):
            m = eqx.combine(general, r, rest)
            if variant == "centred":
                return mean_loss(forward(m, x, delta, lam_pert, keys, True), lam_pert)

            def one(xi, di, lam_i, key_i):
                fn = lambda h: apply(m, xi, h, lam_i, key_i, True)
                return linearized_response(fn, jnp.zeros_like(di), di)[1]

            return mean_loss(jax.vmap(one)(x, delta, lam_pert, keys), lam_pert)

        return jax.value_and_grad(perturbed)(response)

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    if part == "response":
        value, grads_response = response_grads(response, general, delta, lam_pert, keys_response)
        return value, eqx.combine(zeros(general), grads_response)
    value, grads_general = general_value_and_grads(general, response, lam_now, keys)
    if part == "general":
        return value, eqx.combine(grads_general, zeros(response))
    _, grads_response = response_grads(response, general, delta, lam_pert, keys_response)
    return value, eqx.combine(grads_general, grads_response)


def _perturbed_step(apply, mean_loss, params, rest, x, delta, lam_now, lam_pert, keys, coupled):
    """Δ-STN's step from one JVP at λ₀ + δ (`general="perturbed"` or `"coupled"`)."""

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
        if coupled:
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
    linearize: bool = False,
    noise=None,
):
    r"""The hyper step's objective on a validation batch: the eval-mode validation loss of
    the best-response approximation at per-example perturbed hyperparameters, minus
    `entropy_weight` times the perturbation entropy. Differentiate it with respect to
    `hparams` (values and scales).

    The hyperparameters reach the loss only through the hypernetwork input $h$: the training
    side's `lam` (dropout rates, augmentation) is passed with its gradient stopped, as eval
    mode does not use it. The prediction is the full forward pass at
    $h = \lambda + \delta - \lambda_0$, as the authors' code runs Δ-STN's hyper step; with
    `linearize=True` (Δ-STN only) it is linearised in $h$ around $h = 0$, which gives the same
    $\lambda$-gradient to first order in $\sigma$ but not the same $\sigma$-gradient.

    **Arguments:**

    - `loss`: `(out, y) -> scalar` on one example: the validation loss.
    - `centre`: the centre $\lambda_0$ of the centred variants (unconstrained); by default
        the current values with their gradient stopped, so that the hypergradient flows
        through $\lambda - \lambda_0$ only.
    - `linearize`: Δ-STN only: linearise the prediction in the perturbation (bilevax's
        choice before it followed the reference; cheaper, one JVP at $h = 0$).
    - `noise`: the standard-normal draws $\epsilon$, shape `(batch, h)`, of the perturbations
        $\delta = \sigma \odot \epsilon$; drawn from `key` by default (antithetic draws,
        say, make a test exact).
    - the others as [`bilevax.nn.weight_grads`][].

    **Returns:**

    A scalar.
    """
    _check_variant(variant)
    check_bool("linearize", linearize)
    if linearize and variant != "delta":
        raise ValueError(f"`linearize=True` is for Δ-STN only (variant 'delta'), got {variant!r}.")
    batch = _batch_size(x)
    _check_apply(apply, model, hparams, x)
    model = jax.lax.stop_gradient(model)
    if noise is None:
        delta = hparams.perturbation(key, batch)
    else:
        if jnp.shape(noise) != (batch, len(hparams)):
            raise ValueError(
                f"`noise` must have shape (batch, h) = {(batch, len(hparams))}, got "
                f"{jnp.shape(noise)}."
            )
        delta = hparams.sigma * noise
    u = hparams.values
    lam = jax.lax.stop_gradient(hparams.constrain(u + delta, train=True))
    centre = jax.lax.stop_gradient(u) if centre is None else centre
    h = u + delta if variant == "stn" else u + delta - centre

    if linearize:
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
