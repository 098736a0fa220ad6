r"""The tasks: ridge and per-feature input dropout on diabetes (closed forms known), and MLPs /
a CNN on digits and MNIST with dropout rates and cutout."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from sklearn.datasets import load_digits

import bilevax.nn as bnn

from .. import problems
from ..data import load_mnist, split
from ._loop import Task


# ---------------------------------------------------------------------------------------------
# Ridge: one L2 strength λ = e^u on a linear model.


def _ridge_apply(model, x, h, lam, key, train):
    del lam, key, train
    if h is None:
        return model(x, None)[0], model.general.weight
    return model(x, h)[0], model.effective_weight(h)


def _ridge_train_loss(out, y, lam):
    pred, weight = out
    return (pred - y) ** 2 + jnp.exp(lam[0]) * jnp.sum(weight**2)


def _squared_error(out, y):
    pred = out[0] if isinstance(out, tuple) else out
    return (pred - y) ** 2


def ridge(seed: int, quick: bool) -> Task:
    train, val, test = problems.diabetes(seed)
    return Task(
        name="ridge",
        specs=[bnn.Hyperparameter("log_l2", 0.0, "identity")],
        init_model=lambda key: bnn.StnLinear(10, 1, 1, key=key, dtype=jnp.float64),
        apply=_ridge_apply,
        train_loss=_ridge_train_loss,
        val_loss=_squared_error,
        train=train,
        val=val,
        test=test,
        search=[(-8.0, 4.0, False)],
        epochs=40 if quick else 80,
        warmup=1,
        cycles_per_epoch=20,
        lr=0.05,
        hyper_lr=1e-2,
        scale=0.5,
        hyper_lr_final=0.05,
        trial_epochs=2,
        dtype=jnp.float64,
    )


# How far above the optimum's validation loss a λ may be and still count as optimal, for the
# flatness measurement and the ridge check: 0.1 % of the validation MSE.
RIDGE_VAL_GAP = 1e-3


def _ridge_losses(task: Task):
    """The exact validation and test MSE of ridge as functions of log λ."""
    (X, y), (Xv, yv), (Xt, yt) = [
        tuple(map(np.asarray, d)) for d in (task.train, task.val, task.test)
    ]
    n = len(y)

    def weights(u):
        return np.linalg.solve(X.T @ X / n + np.exp(u) * np.eye(X.shape[1]), X.T @ y / n)

    val = lambda u: float(np.mean((Xv @ weights(u) - yv) ** 2))
    test = lambda u: float(np.mean((Xt @ weights(u) - yt) ** 2))
    return val, test


def ridge_closed_form(task: Task) -> dict:
    """The scalar λ* minimising the exact validation MSE of ridge over the search box, by
    bounded Brent on log λ after a grid (the loss is smooth and unimodal in practice on this
    data), and how flat the loss is there: `flat_log_l2`, the range of log λ on the grid whose
    validation loss is within `RIDGE_VAL_GAP` (relative) of the optimum's."""
    val, test = _ridge_losses(task)
    ((lower, upper, _),) = task.search
    grid = np.linspace(lower, upper, 241)
    losses = np.asarray([val(u) for u in grid])
    u0 = grid[int(np.argmin(losses))]
    r = scipy.optimize.minimize_scalar(
        val,
        bounds=(max(u0 - 0.05, lower), min(u0 + 0.05, upper)),  # within the box
        method="bounded",
        options=dict(xatol=1e-10),
    )
    u = float(r.x)
    flat = grid[losses <= (1 + RIDGE_VAL_GAP) * val(u)]
    return dict(
        log_l2=u,
        hparams=[u],
        val_loss=val(u),
        test_loss=test(u),
        flat_log_l2=[float(flat.min()), float(flat.max())],
    )


def ridge_val_gap(task: Task, log_l2: float, reference: dict) -> float:
    """`E(λ) / E(λ*) − 1`: how far the exact ridge solution at `log_l2` is from the best
    validation MSE (`reference`, from `ridge_closed_form`)."""
    val, _ = _ridge_losses(task)
    return val(log_l2) / reference["val_loss"] - 1


# ---------------------------------------------------------------------------------------------
# Linear regression with per-feature input dropout.


def _dropout_apply(model, x, h, lam, key, train):
    # Ten units summed: still linear regression (w = 1ᵀW), but the best-response Jacobian
    # dw/dλ (10 x 10) is within reach of the layer's bottleneck, which a single output unit
    # would restrict to rank one.
    x = bnn.dropout(x, lam, key, train=train)
    return jnp.sum(model(x, h))


P_MAX = 0.9


def dropout_regression(seed: int, quick: bool) -> Task:
    train, val, test = problems.diabetes(seed)
    # Rates near 1 scale the kept inputs by 1/(1 − p) without bound: the range stops at 0.9.
    specs = [bnn.Hyperparameter(f"p{j}", 0.1, "sigmoid", 0.0, P_MAX) for j in range(10)]
    return Task(
        name="dropout-regression",
        specs=specs,
        init_model=lambda key: bnn.StnLinear(10, 10, 10, key=key, dtype=jnp.float64),
        apply=_dropout_apply,
        train_loss=lambda out, y, lam: (out - y) ** 2,
        val_loss=_squared_error,
        train=train,
        val=val,
        test=test,
        search=[(0.0, P_MAX, False)] * 10,
        epochs=40 if quick else 80,
        warmup=1,
        cycles_per_epoch=20,
        lr=0.01,
        hyper_lr=1e-2,
        scale=0.5,
        hyper_lr_final=0.05,
        lr_final=0.05,
        trial_epochs=2,
        dtype=jnp.float64,
    )


def dropout_weights(p, X, y):
    """$w^*(p) = (X^\\top X + \\operatorname{diag}(p/(1-p)) \\operatorname{diag}(X^\\top X))^{-1}
    X^\\top y$: the minimiser of the expected training loss under input dropout."""
    G = X.T @ X
    r = p / (1 - p)
    return np.linalg.solve(G + np.diag(r * np.diag(G)), X.T @ y)


def dropout_closed_form(task: Task, seed: int = 0) -> dict:
    """The best validation MSE over dropout rates in [0, `P_MAX`] of the exact minimiser,
    by L-BFGS-B on log(p/(1-p)) from several starts."""
    (X, y), (Xv, yv), (Xt, yt) = [
        tuple(map(np.asarray, d)) for d in (task.train, task.val, task.test)
    ]
    G = X.T @ X
    Xty = X.T @ y

    def val_and_grad(v):
        r = np.exp(v)
        A = G + np.diag(r * np.diag(G))
        w = np.linalg.solve(A, Xty)
        resid = Xv @ w - yv
        gw = 2 * Xv.T @ resid / len(yv)
        # dE/dr_j = −(A⁻¹ gw)_j · G_jj w_j
        adj = np.linalg.solve(A, gw)
        return float(np.mean(resid**2)), -adj * np.diag(G) * w * r

    rng = np.random.default_rng(seed)
    starts = [np.full(10, np.log(0.1 / 0.9)), np.full(10, -8.0)] + [
        rng.uniform(-8, 2, 10) for _ in range(6)
    ]
    bounds = [(-16.0, float(np.log(P_MAX / (1 - P_MAX))))] * 10
    best, _ = problems.lbfgsb_from(val_and_grad, starts, bounds, maxiter=2000)
    r = np.exp(best.x)
    p = r / (1 + r)
    return dict(
        hparams=p,
        val_loss=float(best.fun),
        test_loss=float(np.mean((Xt @ dropout_weights(p, X, y) - yt) ** 2)),
    )


def dropout_exact_val_loss(task: Task, p) -> float:
    """The validation MSE of the exact $w^*(p)$ (what a converged training at `p` gives)."""
    (X, y), (Xv, yv) = [tuple(map(np.asarray, d)) for d in (task.train, task.val)]
    return float(np.mean((Xv @ dropout_weights(np.asarray(p), X, y) - yv) ** 2))


def dropout_response_jacobian(task: Task, variant: str, model, hparams) -> dict:
    r"""The best-response Jacobian $\partial w / \partial u$ that a trained self-tuning
    network of `variant` has learned on `task` (dropout regression), against the exact one,
    both at the network's current hyperparameters, in their unconstrained coordinates $u$.

    The network's regression weights are $w(h) = \mathbf 1^\top (W + \operatorname{diag}(Hh)
    V)$ (its ten units summed), so its estimate is $\partial w / \partial h$ at the eval-mode
    input $h$; the exact one differentiates $w^*(p(u))$ of `dropout_weights`.

    **Returns:**

    `learned` and `exact` (10 × 10) and the relative error `relerr` (Frobenius norm).
    """
    X, y = (jnp.asarray(a) for a in task.train)
    G = X.T @ X

    def exact_weights(u):
        p = hparams.constrain(u)
        r = p / (1 - p)
        return jnp.linalg.solve(G + jnp.diag(r * jnp.diag(G)), X.T @ y)

    learned_weights = lambda h: jnp.sum(model.effective_weight(h), axis=0)
    exact = jax.jacfwd(exact_weights)(hparams.values)
    learned = jax.jacfwd(learned_weights)(bnn.eval_input(variant, hparams))
    return dict(learned=learned, exact=exact, relerr=problems.relerr(learned, exact))


# ---------------------------------------------------------------------------------------------
# Classification: MLPs on digits and MNIST, a CNN on MNIST.


def _cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _mlp_apply(model, x, h, lam, key, train):
    return model(x, h, lam, key, train=train)


def _cnn_apply(model, x, h, lam, key, train):
    if train and key is not None:
        key, sub = jax.random.split(key)
        x = bnn.cutout(x, lam[4], lam[5], sub, max_holes=4)
    return model(x, h, lam[:4], key, train=train)


def _classification(name, X, y, sizes, seed, **kwargs) -> Task:
    parts = split(len(y), sizes, seed)
    arrays = [(jnp.asarray(X[i], jnp.float32), jnp.asarray(y[i], jnp.int32)) for i in parts]
    return Task(
        name=name,
        val_loss=_cross_entropy,
        train_loss=lambda out, y, lam: _cross_entropy(out, y),
        train=arrays[0],
        val=arrays[1],
        test=arrays[2],
        dtype=jnp.float32,
        **kwargs,
    )


RATE_SEARCH = (0.0, 0.8, False)
# The reference caps dropout rates at 0.95 (the original STN at 0.9, "improves stability"): at
# 1, 1/(1 − p) is unbounded, and a p that rounds to 1 in float32 gives a NaN gradient.
RATE_CAP = 0.95


def _rates(k: int, init: float = 0.05):
    return [bnn.Hyperparameter(f"dropout{i}", init, "sigmoid", 0.0, RATE_CAP) for i in range(k)]


def digits_mlp(seed: int, quick: bool) -> Task:
    X, y = load_digits(return_X_y=True)
    specs = _rates(3)
    return _classification(
        "digits-mlp",
        X / 16.0,
        y,
        (1000, 400, 397),
        seed,
        specs=specs,
        init_model=lambda key: bnn.StnMLP((64, 128, 128, 10), 3, key=key, dtype=jnp.float32),
        apply=_mlp_apply,
        search=[RATE_SEARCH] * 3,
        epochs=40 if quick else 100,
        warmup=2,
        batch_size=50,
        lr=0.1,
        lr_final=0.1,
        hyper_lr=1e-2,
        trial_epochs=5 if quick else 10,
    )


def _mnist(args_data_dir):
    images, labels = load_mnist(args_data_dir)
    return images.astype(np.float32) / 255.0, labels


def mnist_mlp(seed: int, quick: bool, data_dir=None) -> Task:
    images, labels = _mnist(data_dir)
    return _classification(
        "mnist-mlp",
        images.reshape(len(labels), -1),
        labels,
        (6000, 1500, 2500),
        seed,
        specs=_rates(3),
        init_model=lambda key: bnn.StnMLP((784, 256, 256, 10), 3, key=key, dtype=jnp.float32),
        apply=_mlp_apply,
        search=[RATE_SEARCH] * 3,
        epochs=8 if quick else 20,
        warmup=1,
        batch_size=128,
        lr=0.05,
        lr_final=0.1,
        hyper_lr=1e-2,
        trial_epochs=2 if quick else 5,
    )


def mnist_cnn(seed: int, quick: bool, data_dir=None) -> Task:
    images, labels = _mnist(data_dir)
    specs = [
        *_rates(4),
        bnn.Hyperparameter("cutout_length", 4.0, "sigmoid", 0.0, 24.0, integer=True),
        bnn.Hyperparameter("cutout_holes", 1.0, "sigmoid", 0.0, 4.0, integer=True),
    ]
    return _classification(
        "mnist-cnn",
        images[:, None],
        labels,
        (6000, 1500, 2500),
        seed,
        specs=specs,
        init_model=lambda key: bnn.StnCNN(1, 28, 10, len(specs), key=key, dtype=jnp.float32),
        apply=_cnn_apply,
        search=[RATE_SEARCH] * 4 + [(0.0, 24.0, False), (0.0, 4.0, False)],
        epochs=3 if quick else 20,
        warmup=1,
        batch_size=128,
        lr=0.05,
        lr_final=0.1,
        hyper_lr=1e-2,
        trial_epochs=1 if quick else 4,
    )


# Every method the experiments compare, with its name in tables and figures.
METHODS = {
    "delta": "Δ-STN",
    "centred": "centred STN",
    "stn": "STN",
    "random": "random search",
    "tpe": "TPE",
}
TASKS = {
    "ridge": ridge,
    "dropout-regression": dropout_regression,
    "digits-mlp": digits_mlp,
    "mnist-mlp": mnist_mlp,
    "mnist-cnn": mnist_cnn,
}


# The optimisation settings of a self-tuning run. "bilevax": each task's own (tuned here for
# short CPU runs: σ₀ = 0.5, one or two warm-up epochs, a larger weight step that decays).
# "reference": the defaults of the authors' code (pomonam/Self-Tuning-Networks,
# `examples/mlp/train.py`): σ₀ = 1, 5 warm-up epochs, SGD 0.01 with momentum 0.9 and no decay,
# T_train = 5, T_valid = 1, RMSprop 1e-2 (PyTorch's: α = 0.99, ε outside the root) on λ and σ
# with no decay, τ = 1e-3.
RECIPES = {
    "bilevax": {},
    "reference": dict(
        scale=1.0,
        warmup=5,
        lr=0.01,
        lr_final=1.0,
        momentum=0.9,
        t_train=5,
        t_valid=1,
        hyper_lr=1e-2,
        hyper_lr_final=1.0,
        scale_lr=1e-2,
        entropy_weight=1e-3,
        rms_decay=0.99,
        rms_eps_in_sqrt=False,
    ),
}


def make_task(
    name: str,
    seed: int,
    quick: bool,
    data_dir=None,
    *,
    recipe: str = "bilevax",
    rate_cap: float | None = None,
    **overrides,
) -> Task:
    """The task `name` (a key of `TASKS`) with the settings of `recipe` (a key of `RECIPES`),
    its dropout rates capped at `rate_cap` (default `RATE_CAP`), then `overrides` of its
    settings (e.g. `epochs`; `None` values are ignored)."""
    if name not in TASKS:
        raise ValueError(f"`task` must be one of {sorted(TASKS)}, got {name!r}.")
    if recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {sorted(RECIPES)}, got {recipe!r}.")
    make = TASKS[name]
    if name.startswith("mnist"):
        make = functools.partial(make, data_dir=data_dir)
    task = make(seed, quick)
    task = dataclasses.replace(task, recipe=recipe, **RECIPES[recipe])
    if rate_cap is not None:
        if not 0 < rate_cap <= 1:
            raise ValueError(f"`rate_cap` must be in (0, 1], got {rate_cap!r}.")
        capped = [
            dataclasses.replace(s, upper=rate_cap) if s.name.startswith("dropout") else s
            for s in task.specs
        ]
        task = dataclasses.replace(task, specs=capped)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(task, **overrides)


def add_method_options(p) -> None:
    """The command-line options that choose the recipe and the algorithm of the self-tuning
    runs (each recorded in the run's configuration, so a resume with others is refused)."""
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="bilevax",
        help="the optimisation settings: each task's own, or the reference code's defaults",
    )
    p.add_argument(
        "--general",
        choices=("centre", "perturbed", "coupled"),
        default="centre",
        help="how the centred variants train w0: at λ0 (Algorithm 1), or bilevax's earlier steps",
    )
    p.add_argument(
        "--hyper-step",
        choices=("full", "linearized"),
        default="full",
        help="Δ-STN's hyper step: the full centred forward (the reference) or linearised",
    )
    p.add_argument(
        "--rate-cap", type=float, default=None, help=f"the dropout rates' upper end ({RATE_CAP})"
    )
    p.add_argument(
        "--step-order",
        choices=("simultaneous", "sequential"),
        default="simultaneous",
        help="sequential: w0 stepped first, the response's gradient at the new w0 (the reference)",
    )


def method_options(args) -> dict:
    """`make_task`'s keyword arguments from the options of `add_method_options`."""
    return dict(
        recipe=args.recipe,
        rate_cap=args.rate_cap,
        general=args.general,
        hyper_step=args.hyper_step,
        step_order=args.step_order,
    )
