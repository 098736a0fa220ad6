"""The self-tuning loop (STN, centred STN, Δ-STN) and the plain training that random search
and TPE run for each trial, both over epochs of jitted `lax.scan`s, checkpointed per epoch."""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

import bilevax.nn as bnn

from .. import _harness
from .._optax import optax_step


@dataclasses.dataclass(frozen=True)
class Task:
    """One tuning problem: data, model, losses and the loop's settings.

    `apply(model, x, h, lam, key, train)` and `train_loss(out, y, lam)` are per example, as
    `bilevax.nn.weight_grads` takes them; `val_loss(out, y)` is the loss every method is
    judged on (eval mode). `h=None` asks `apply` for a plain network (general weights only).
    """

    name: str
    specs: Sequence[bnn.Hyperparameter]
    init_model: Callable
    apply: Callable
    train_loss: Callable
    val_loss: Callable
    train: tuple
    val: tuple
    test: tuple
    search: Sequence[tuple[float, float, bool]]  # per hyperparameter: (low, high, log)
    epochs: int
    warmup: int = 0
    batch_size: int | None = None  # None: full batch
    cycles_per_epoch: int | None = None  # full batch: cycles in one "epoch"
    lr: float = 1e-2
    momentum: float = 0.9
    hyper_lr: float = 3e-3
    scale_lr: float | None = None  # RMSprop's rate on the scales (default: hyper_lr)
    hyper_lr_final: float = 1.0  # the rate on the values decays linearly to this fraction
    lr_final: float = 1.0  # the weights' learning rate decays linearly to this fraction
    scale: float = 0.5
    entropy_weight: float = 1e-3
    t_train: int = 5
    t_valid: int = 1
    trial_epochs: int = 1  # epochs of one random-search / TPE trial
    dtype: object = jnp.float32
    # RMSprop on λ and σ: optax's defaults (decay 0.9, ε inside the root), or PyTorch's as the
    # reference uses them (α = 0.99, ε outside).
    rms_decay: float = 0.9
    rms_eps_in_sqrt: bool = True
    # The algorithm, as `bilevax.nn.weight_grads(general=...)` and
    # `bilevax.nn.hyper_loss(linearize=...)` take it: Algorithm 1 by default.
    general: str = "centre"
    hyper_step: str = "full"  # or "linearized" (Δ-STN only)
    # "simultaneous": w₀'s and the response's gradients at the same w₀, one SGD step;
    # "sequential": as the authors' code, w₀ stepped first (its own SGD state), then the
    # response's gradient taken at the new w₀ (centred variants only).
    step_order: str = "simultaneous"
    recipe: str = "bilevax"  # the name of the settings above (see `_tasks.RECIPES`)


def _batches(n: int, batch: int | None, steps: int, rng: np.random.Generator) -> np.ndarray:
    """`steps` index batches from shuffled passes over `range(n)`."""
    if batch is None or batch >= n:
        return np.broadcast_to(np.arange(n), (steps, n)).copy()
    per_pass = n // batch
    passes = -(-steps // per_pass)
    order = np.concatenate([rng.permutation(n)[: per_pass * batch] for _ in range(passes)])
    return order[: steps * batch].reshape(steps, batch)


# Standard-normal quantiles at the midpoints of 256 equal-probability bins: a deterministic
# quadrature for the expectations over the perturbation.
_NORMAL_NODES = scipy.stats.norm.ppf((np.arange(256) + 0.5) / 256)


def applied_values(hparams: bnn.HyperParameters) -> np.ndarray:
    """The hyperparameters the training side applies on average, E[constrain(u + σz)] with
    z ~ N(0, 1): with σ of 2–3 a dropout rate reported as sigmoid(u) = 0.04 is applied at
    0.1–0.17 on average, which is what the weights train at."""
    u, sigma = np.asarray(hparams.values), np.asarray(hparams.sigma)
    perturbed = u[None] + sigma[None] * _NORMAL_NODES[:, None]
    values = hparams.constrain(jnp.asarray(perturbed, hparams.values.dtype), train=True)
    return np.asarray(values).mean(0)


def cycles_per_epoch(task: Task) -> int:
    if task.cycles_per_epoch is not None:
        return task.cycles_per_epoch
    n = len(task.train[1])
    return max(1, n // (task.batch_size or n) // task.t_train)


def _evaluate(task: Task, variant, model, hparams, data):
    x, y = data
    out = bnn.predict(variant, task.apply, model, hparams, x)
    return jnp.mean(jax.vmap(task.val_loss)(out, y))


def weight_phase_step(task: Task, variant: str, optimizer, model, hparams, w_state, batch, key):
    """One step of the weight phase on `batch = (x, y)`: `(model, w_state, loss)`.

    `optimizer` is one optax transformation, which steps every weight on the gradients of
    one `weight_grads` call (`step_order="simultaneous"`), or a pair of them masked to the
    general and the response weights (`"sequential"`, the authors' code): $w_0$ is stepped
    first, and the response's gradient is taken at the new $w_0$."""
    x, y = batch
    grads_of = lambda model, part: bnn.weight_grads(
        variant,
        task.apply,
        task.train_loss,
        model,
        hparams,
        x,
        y,
        key,
        general=task.general,
        part=part,
    )
    if isinstance(optimizer, optax.GradientTransformation):  # (a NamedTuple: test it first)
        loss, grads = grads_of(model, "both")
        model, w_state = optax_step(optimizer, grads, w_state, model)
        return model, w_state, loss
    loss, grads = grads_of(model, "general")
    model, general_state = optax_step(optimizer[0], grads, w_state[0], model)
    _, grads = grads_of(model, "response")
    model, response_state = optax_step(optimizer[1], grads, w_state[1], model)
    return model, (general_state, response_state), loss


def self_tuning(
    task: Task, variant: str, seed: int, run: _harness.Run, name: str | None = None
) -> dict:
    """Trains a self-tuning network of `variant` for `task.epochs` epochs (the first
    `task.warmup` without hyper steps) and records, after every epoch, the hyperparameters,
    their perturbation scales and the eval-mode validation loss.

    **Returns:**

    A history dict; `val_loss` and `test_loss` are those at the epoch with the best validation
    loss, `seconds` the wall-clock at the end of each epoch (compilation included, summed over
    resumed invocations). The run is checkpointed under `name` (default `"<variant>_<seed>"`).
    """
    name = name or f"{variant}_{seed}"
    key = jax.random.key(seed)
    model = task.init_model(jax.random.fold_in(key, 1))
    hparams = bnn.HyperParameters(task.specs, scale=task.scale, dtype=task.dtype)
    weight_steps = task.epochs * cycles_per_epoch(task) * task.t_train
    w_opt = optax.sgd(
        optax.linear_schedule(task.lr, task.lr * task.lr_final, weight_steps), task.momentum
    )
    hyper_steps = max(1, (task.epochs - task.warmup) * cycles_per_epoch(task) * task.t_valid)
    rmsprop = functools.partial(
        optax.rmsprop, decay=task.rms_decay, eps_in_sqrt=task.rms_eps_in_sqrt
    )
    h_opt = rmsprop(
        optax.linear_schedule(task.hyper_lr, task.hyper_lr * task.hyper_lr_final, hyper_steps)
    )
    s_opt = rmsprop(task.hyper_lr if task.scale_lr is None else task.scale_lr)
    params = eqx.filter(model, eqx.is_inexact_array)
    sequential = task.step_order == "sequential" and variant != "stn"
    if sequential:
        # Two SGD states, as the reference's two optimisers: each masked to its weights.
        is_response = bnn.response_filter(params)
        is_general = jax.tree.map(lambda r: not r, is_response)
        w_opts = (optax.masked(w_opt, is_general), optax.masked(w_opt, is_response))
    fresh = lambda: dict(
        model=model,
        hparams=hparams,
        w_state=tuple(o.init(params) for o in w_opts) if sequential else w_opt.init(params),
        h_state=(h_opt.init(hparams.values), s_opt.init(hparams.scales)),
        history=dict(
            epoch=[],
            hparams=[],
            sigma=[],
            applied=[],
            val_curve=[],
            test_curve=[],
            train_curve=[],
            seconds=[],
        ),
    )
    cycles = cycles_per_epoch(task)

    def cycle(carry, inputs, tune, data):
        (xtr, ytr), (xval, yval) = data
        train_idx, val_idx, key = inputs
        key_train, key_val = jax.random.split(key)

        def weight_step(carry, inputs):
            model, hparams, w_state, h_state = carry
            idx, key = inputs
            optimizer = w_opts if sequential else w_opt
            batch = (xtr[idx], ytr[idx])
            model, w_state, loss = weight_phase_step(
                task, variant, optimizer, model, hparams, w_state, batch, key
            )
            return (model, hparams, w_state, h_state), loss

        def hyper_step(carry, inputs):
            model, hparams, w_state, h_state = carry
            idx, key = inputs
            grads = eqx.filter_grad(
                lambda hp: bnn.hyper_loss(
                    variant,
                    task.apply,
                    task.val_loss,
                    model,
                    hp,
                    xval[idx],
                    yval[idx],
                    key,
                    entropy_weight=task.entropy_weight,
                    linearize=variant == "delta" and task.hyper_step == "linearized",
                )
            )(hparams)
            values, v_state = optax_step(h_opt, grads.values, h_state[0], hparams.values)
            scales, s_state = optax_step(s_opt, grads.scales, h_state[1], hparams.scales)
            hparams = eqx.tree_at(lambda hp: (hp.values, hp.scales), hparams, (values, scales))
            return (model, hparams, w_state, (v_state, s_state)), None

        keys = jax.random.split(key_train, task.t_train)
        carry, losses = jax.lax.scan(weight_step, carry, (train_idx, keys))
        keys = jax.random.split(key_val, task.t_valid)
        # A traced switch: warm-up and tuning epochs share one compiled program.
        carry = jax.lax.cond(
            tune,
            lambda c: jax.lax.scan(hyper_step, c, (val_idx, keys))[0],
            lambda c: c,
            carry,
        )
        return carry, jnp.mean(losses)

    # The data are arguments, not constants baked into the executable.
    @eqx.filter_jit
    def epoch(carry, data, test, train_idx, val_idx, keys, tune):
        carry, losses = jax.lax.scan(
            lambda c, i: cycle(c, i, tune, data), carry, (train_idx, val_idx, keys)
        )
        model, hparams = carry[0], carry[1]
        val = _evaluate(task, variant, model, hparams, data[1])
        return carry, jnp.mean(losses), val, _evaluate(task, variant, model, hparams, test)

    ytr, yval = task.train[1], task.val[1]
    val_batch = task.batch_size if task.batch_size is not None else len(yval)

    def step(e, state):
        tic = time.perf_counter()
        rng = np.random.default_rng([seed, e])
        train_idx = _batches(len(ytr), task.batch_size, cycles * task.t_train, rng)
        val_idx = _batches(len(yval), val_batch, cycles * task.t_valid, rng)
        keys = jax.random.split(jax.random.fold_in(key, 1000 + e), cycles)
        carry = (state["model"], state["hparams"], state["w_state"], state["h_state"])
        carry, train_loss, val_loss, test_loss = epoch(
            carry,
            (task.train, task.val),
            task.test,
            jnp.asarray(train_idx.reshape(cycles, task.t_train, -1)),
            jnp.asarray(val_idx.reshape(cycles, task.t_valid, -1)),
            keys,
            jnp.asarray(e >= task.warmup),
        )
        state["model"], state["hparams"], state["w_state"], state["h_state"] = carry
        history, hp = state["history"], carry[1]
        history["epoch"].append(e + 1)
        history["hparams"].append(np.asarray(hp.value()))
        history["sigma"].append(np.asarray(hp.sigma))
        history["applied"].append(applied_values(hp))
        history["val_curve"].append(float(val_loss))
        history["test_curve"].append(float(test_loss))
        history["train_curve"].append(float(train_loss))
        history["seconds"].append(state["seconds"] + time.perf_counter() - tic)
        best = np.fmin.reduce(history["val_curve"])
        return state, f"val {float(val_loss):.4f}  best {best:.4f}"

    description = f"{task.name} {variant} s{seed}"
    state = run.loop(name, task.epochs, fresh, step, description=description)
    history = state["history"]
    curve = np.asarray(history["val_curve"])
    # A diverged run (NaN from some epoch on) is judged on its epochs before divergence.
    best = int(np.nanargmin(curve)) if np.isfinite(curve).any() else len(curve) - 1
    hparams = state["hparams"]
    return dict(
        history,
        # Model selection on the validation set: the epoch with the best validation loss.
        diverged=bool(not np.isfinite(curve[-1])),
        val_loss=history["val_curve"][best],
        test_loss=history["test_curve"][best],
        best_epoch=best + 1,
        final_val_loss=history["val_curve"][-1],
        final_test_loss=history["test_curve"][-1],
        final_hparams=np.asarray(hparams.value()),
        final_sigma=np.asarray(hparams.sigma),
        final_applied=applied_values(hparams),
        # The trained network and hyperparameters, for checks against closed forms.
        model=state["model"],
        hyperparameters=hparams,
    )


def _plain_apply(task: Task):
    return lambda model, x, h, lam, key, train: task.apply(model, x, None, lam, key, train)


_PLAIN = {}  # compiled plain-training functions, per task object: one compilation per search


def forget_compiled():
    """Drops the compiled plain-training functions, so that the next search compiles its own
    (a timed search then pays for its compilation, as a user's would)."""
    _PLAIN.clear()


def _plain_functions(task: Task):
    if id(task) in _PLAIN and _PLAIN[id(task)][0] is task:
        return _PLAIN[id(task)][1:]
    apply = _plain_apply(task)
    w_opt = optax.sgd(
        optax.linear_schedule(
            task.lr,
            task.lr * task.lr_final,
            task.trial_epochs * cycles_per_epoch(task) * task.t_train,
        ),
        task.momentum,
    )

    def step(carry, inputs, train, lam):
        xtr, ytr = train
        model, w_state = carry
        idx, key = inputs
        keys = jax.random.split(key, idx.shape[0])

        def loss(m):
            out = jax.vmap(apply, in_axes=(None, 0, None, None, 0, None))(
                m, xtr[idx], None, lam, keys, True
            )
            return jnp.mean(jax.vmap(task.train_loss, in_axes=(0, 0, None))(out, ytr[idx], lam))

        grads = eqx.filter_grad(loss)(model)
        return optax_step(w_opt, grads, w_state, model), None

    @eqx.filter_jit
    def evaluate(model, data, lam):
        x, y = data
        out = jax.vmap(lambda xi: apply(model, xi, None, lam, None, False))(x)
        return jnp.mean(jax.vmap(task.val_loss)(out, y))

    @eqx.filter_jit
    def epoch(carry, train, val, test, lam, idx, keys):
        carry, _ = jax.lax.scan(lambda c, i: step(c, i, train, lam), carry, (idx, keys))
        return carry, evaluate(carry[0], val, lam), evaluate(carry[0], test, lam)

    _PLAIN[id(task)] = (task, w_opt, epoch, evaluate)
    return w_opt, epoch, evaluate


def plain_training(
    task: Task, lam, seed: int, epochs: int, model=None
) -> tuple[float, float, list]:
    """Trains the network with fixed hyperparameters `lam` (in their ranges) for `epochs`
    epochs (at most `task.trial_epochs`, the length of the learning-rate schedule) of the
    same number of weight steps as the self-tuning loop, general weights only, from `model`
    (default: the task's initialisation for `seed`).

    **Returns:**

    `(val_loss, test_loss, val_loss_per_epoch)` in eval mode, at the epoch with the best
    validation loss (model selection on the validation set, as for the self-tuning runs).
    """
    w_opt, epoch, evaluate = _plain_functions(task)
    key = jax.random.key(seed)
    model = task.init_model(jax.random.fold_in(key, 1)) if model is None else model
    lam = jnp.asarray(lam, task.dtype)
    steps = cycles_per_epoch(task) * task.t_train
    carry = (model, w_opt.init(eqx.filter(model, eqx.is_inexact_array)))
    curve, tests = [], []
    for e in range(epochs):
        rng = np.random.default_rng([seed, 7, e])
        idx = jnp.asarray(_batches(len(task.train[1]), task.batch_size, steps, rng))
        keys = jax.random.split(jax.random.fold_in(key, e), steps)
        carry, val, test = epoch(carry, task.train, task.val, task.test, lam, idx, keys)
        curve.append(float(val))
        tests.append(float(test))
    best = int(np.nanargmin(curve)) if np.isfinite(curve).any() else len(curve) - 1
    return curve[best], tests[best], curve
