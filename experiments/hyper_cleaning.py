r"""Data hyper-cleaning on MNIST (Franceschi et al. 2017): one weight per training example.

Half of the training labels are corrupted (each to another class, uniformly). Every training
example $i$ gets a weight $\sigma(u_i)$, and the inner problem is weighted multinomial logistic
regression with a small L2 penalty,

$$L(w, u) = \tfrac1n \sum_i \sigma(u_i)\, \ell(w; x_i, y_i) + \tfrac{\rho}{2}\|W\|^2, \qquad
  E(w) = \tfrac1m \sum_j \ell(w; x^{val}_j, y^{val}_j),$$

with $\ell$ the cross-entropy and the validation set clean. Adam on $u$ (from $u = 0$, weight
1/2) follows either the unrolled hypergradient (`bx.unrolled_hypergrad`, $T$ gradient steps
from zero, reverse mode) or the implicit one (`bx.implicit_hypergrad` at a `bx.inner_solve`
solution warm-started from the previous hyper-step's, CG). A weight below 1/2 flags an example
as corrupted. The model retrained with the learned weights is compared on the test set with
the model trained on all the corrupted data (baseline) and on the clean half only (oracle).

    python -m experiments.hyper_cleaning [--quick] [--out DIR] [--data-dir DIR] [--seed S]
                                         [--resume | --overwrite]
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
from jaxtyping import Array, Float, Int

import bilevax as bx

from . import _cli, _console, _harness, _outputs
from ._optax import optax_step
from .data import data_dir, load_mnist, split


SPLIT = (4000, 2000, 4000)  # train / validation / test, from the 10,000 MNIST test digits
NUM_CLASSES = 10
CORRUPT_FRACTION = 0.5
L2 = 1e-3  # ρ: small, so that the baseline really does fit the noise
# Heavy ball for the inner problem: ‖x‖² ≈ 90 puts the Hessian's largest eigenvalue below ~20,
# and a step of 0.1 with momentum 0.9 is stable up to 38.
INNER_LR, INNER_MOMENTUM = 0.1, 0.9
INNER_TOL = 1e-4  # ‖∇_w L‖ at which `inner_solve` stops (float32)
INNER_MAX_STEPS = 100  # per warm-started solve in the implicit method
RETRAIN_STEPS = 3000  # "to convergence", from zero, for the reported accuracies
METHODS = {"unrolled": "unrolled (reverse, T steps from 0)", "implicit": "implicit (CG)"}


class Problem(eqx.Module):
    """Flattened images in [0, 1], the corrupted training labels and which ones were changed."""

    train: tuple[Float[Array, "n 784"], Int[Array, " n"]]
    val: tuple[Float[Array, "m 784"], Int[Array, " m"]]
    test: tuple[Float[Array, "k 784"], Int[Array, " k"]]
    corrupted: Int[Array, " n"]  # 1 where the label was changed
    clean_train_labels: Int[Array, " n"]


def corrupt_labels(
    labels: np.ndarray, fraction: float, seed: int, num_classes: int = NUM_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Changes the labels of exactly `round(fraction * n)` examples, chosen at random, each to
    one of the *other* `num_classes - 1` classes uniformly.

    **Returns:**

    `(noisy_labels, corrupted)`: int32 labels and a boolean mask of the changed examples.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    corrupted = np.zeros(n, bool)
    corrupted[rng.choice(n, int(round(fraction * n)), replace=False)] = True
    # A shift in 1..K-1 (mod K) is uniform over the other classes and never the same one.
    shift = rng.integers(1, num_classes, n)
    noisy = np.where(corrupted, (labels + shift) % num_classes, labels).astype(np.int32)
    return noisy, corrupted


def load(data_dir, seed: int, sizes=SPLIT, dtype=jnp.float32) -> Problem:
    """MNIST's 10,000 test digits split with `seed`, half the training labels corrupted."""
    images, labels = load_mnist(data_dir, split="test")
    X = images.reshape(len(images), -1).astype(np.float64) / 255.0
    tr, va, te = split(len(labels), sizes, seed)
    noisy, corrupted = corrupt_labels(labels[tr], CORRUPT_FRACTION, seed + 1)
    arrays = lambda idx, y: (jnp.asarray(X[idx], dtype), jnp.asarray(y, jnp.int32))
    return Problem(
        train=arrays(tr, noisy),
        val=arrays(va, labels[va]),
        test=arrays(te, labels[te]),
        corrupted=jnp.asarray(corrupted, jnp.int32),
        clean_train_labels=jnp.asarray(labels[tr], jnp.int32),
    )


def init_params(problem: Problem):
    dtype = problem.train[0].dtype
    return (
        jnp.zeros((problem.train[0].shape[1], NUM_CLASSES), dtype),
        jnp.zeros(NUM_CLASSES, dtype),
    )


def _cross_entropy(params, X, y):
    W, b = params
    logits = X @ W + b
    picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - picked


def inner_loss(params, u, data):
    return weighted_loss(params, jax.nn.sigmoid(u), data)


def weighted_loss(params, weights, data):
    """The inner loss with the example weights given directly (baseline, oracle, retraining)."""
    X, y = data
    W, b = params
    # The bias is penalised too: on (nearly) separable data its curvature vanishes otherwise.
    penalty = 0.5 * L2 * (jnp.sum(W**2) + jnp.sum(b**2))
    return jnp.mean(weights * _cross_entropy(params, X, y)) + penalty


def outer_loss(params, u, data):
    del u
    X, y = data
    return jnp.mean(_cross_entropy(params, X, y))


def accuracy(params, data):
    X, y = data
    W, b = params
    return jnp.mean((jnp.argmax(X @ W + b, axis=1).astype(y.dtype) == y).astype(X.dtype))


SOLVER = bx.GradientDescent(INNER_LR, INNER_MOMENTUM)
SOLVE_PRECISION = bx.contrib.PrecisionPolicy(jnp.float32, jnp.float64)


@eqx.filter_jit
def unrolled_step(u, problem: Problem, num_steps: int):
    """`num_steps` heavy-ball steps from zero, differentiated in reverse mode through them."""
    return bx.unrolled_hypergrad(
        outer_loss,
        inner_loss,
        init_params(problem),
        u,
        problem.train,
        problem.val,
        solver=SOLVER,
        num_steps=num_steps,
    )


@eqx.filter_jit
def implicit_step(
    u,
    warm,
    problem: Problem,
    max_steps: int = INNER_MAX_STEPS,
    tol: float = INNER_TOL,
    cg_rtol: float = 1e-3,
):
    """An inner solve warm-started at `warm`, then the implicit hypergradient (CG) at it."""
    sol = bx.inner_solve(
        inner_loss, warm, u, problem.train, solver=SOLVER, max_steps=max_steps, tol=tol
    )
    # The linear solve runs in float64: lineax's CG declares a breakdown when p·Hp falls below
    # 100·n·eps·‖r‖², and with n = 7850 float32 parameters that rejects every curvature below
    # ~0.1, so an L2 of 1e-3 gives NaN after a few iterations.
    wide = SOLVE_PRECISION.solve
    value, hgrad = bx.implicit_hypergrad(
        outer_loss,
        inner_loss,
        wide(sol.params),
        wide(u),
        wide(problem.train),
        wide(problem.val),
        linear_solver=lx.CG(rtol=cg_rtol, atol=1e-12, max_steps=300),
    )
    return value.astype(u.dtype), hgrad.astype(u.dtype), sol.params, sol.stats["num_steps"]


@eqx.filter_jit
def train(weights, problem: Problem, max_steps: int, tol: float = 0.0):
    """The inner problem with fixed example weights, from zero."""
    sol = bx.inner_solve(
        weighted_loss,
        init_params(problem),
        weights,
        problem.train,
        solver=SOLVER,
        max_steps=max_steps,
        tol=tol,
    )
    return sol.params, accuracy(sol.params, problem.test), sol.stats["grad_norm"]


def detection(weights, corrupted) -> dict:
    """Precision, recall and F1 of "weight < 1/2 ⇒ corrupted"."""
    flagged = np.asarray(weights) < 0.5
    corrupted = np.asarray(corrupted).astype(bool)
    tp = int(np.sum(flagged & corrupted))
    precision = tp / max(int(flagged.sum()), 1)
    recall = tp / max(int(corrupted.sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return dict(precision=precision, recall=recall, f1=f1)


def make_optimizer(learning_rate: float):
    return optax.adam(learning_rate)


_hyper_update = eqx.filter_jit(optax_step)


def hyper_clean(
    method: str,
    problem: Problem,
    hyper_steps: int,
    run: _harness.Run,
    *,
    learning_rate: float,
    num_steps: int,
    eval_every: int,
    checkpoint_every: int = 1,
) -> dict:
    """Adam on the unconstrained weights `u`, one hypergradient per step.

    **Arguments:**

    - `method`: `"unrolled"` (`num_steps` inner steps from zero) or `"implicit"` (inner solve
        to `INNER_TOL` warm-started from the previous solution, implicit hypergradient by CG).
    - `hyper_steps`: the number of hypergradient steps.
    - `run`: the run; the state is saved every `checkpoint_every` steps, and a resumed run
        continues from it.
    - `eval_every`: how often to record test accuracy (of the current inner model) and F1.

    **Returns:**

    The history (validation loss every step; accuracy, precision, recall, F1 every
    `eval_every` steps), the final `u` and the seconds spent.
    """
    if method == "unrolled":
        hypergrad = lambda u, w: (*unrolled_step(u, problem, num_steps), w, num_steps)
    elif method == "implicit":
        hypergrad = lambda u, w: implicit_step(u, w, problem)
    else:
        raise ValueError(f"`method` must be 'unrolled' or 'implicit', got {method!r}.")
    optimizer = make_optimizer(learning_rate)

    def fresh():
        u = jnp.zeros(problem.train[0].shape[0], problem.train[0].dtype)
        history = dict(val_loss=[], inner_steps=[], eval_step=[], acc=[], f1=[])
        return dict(u=u, w=init_params(problem), opt_state=optimizer.init(u), history=history)

    def evaluate(k, state):
        # The current inner model: w_T for unrolled, w* (to INNER_TOL) for implicit.
        u, w, history = state["u"], state["w"], state["history"]
        if method == "unrolled":
            w = train(jax.nn.sigmoid(u), problem, num_steps)[0]
        history["eval_step"].append(k)
        history["acc"].append(float(accuracy(w, problem.test)))
        history["f1"].append(detection(jax.nn.sigmoid(u), problem.corrupted)["f1"])

    def step(k, state):
        history = state["history"]
        if k % eval_every == 0:
            evaluate(k, state)
        value, hgrad, state["w"], inner_steps = hypergrad(state["u"], state["w"])
        state["u"], state["opt_state"] = _hyper_update(
            optimizer, hgrad, state["opt_state"], state["u"]
        )
        history["val_loss"].append(float(value))
        history["inner_steps"].append(int(inner_steps))
        best, f1 = min(history["val_loss"]), max(history["f1"], default=float("nan"))
        return state, f"val {float(value):.4f} (best {best:.4f})  best F1 {f1:.3f}"

    state = run.loop(
        method, hyper_steps, fresh, step, description=f"HO ({method})", every=checkpoint_every
    )
    history = state["history"]
    if not history["eval_step"] or history["eval_step"][-1] != hyper_steps:
        evaluate(hyper_steps, state)
    return dict(history, u=np.asarray(state["u"]), seconds=state["seconds"])


def summarise(history: dict, problem: Problem) -> dict:
    weights = jax.nn.sigmoid(jnp.asarray(history["u"]))
    _, acc, grad_norm = train(weights, problem, RETRAIN_STEPS)
    kept = (weights >= 0.5).astype(weights.dtype)
    _, acc_thresholded, _ = train(kept, problem, RETRAIN_STEPS)
    return dict(
        cleaned_acc=float(acc),
        cleaned_acc_thresholded=float(acc_thresholded),
        retrain_grad_norm=float(grad_norm),
        **detection(weights, problem.corrupted),
        final_val_loss=history["val_loss"][-1],
        seconds=history["seconds"],
        mean_inner_steps=float(np.mean(history["inner_steps"])),
        history=dict(
            val_loss=history["val_loss"],
            eval_step=history["eval_step"],
            acc=history["acc"],
            f1=history["f1"],
        ),
        weights=np.asarray(weights),
    )


def plot(results: dict, problem: Problem, path):
    plt = _outputs.pyplot()
    corrupted = np.asarray(problem.corrupted).astype(bool)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    bins = np.linspace(0, 1, 41)
    for ax, name in zip(axes[0], METHODS):
        weights = np.asarray(results[name]["weights"])
        ax.hist(weights[~corrupted], bins, alpha=0.6, label="clean label")
        ax.hist(weights[corrupted], bins, alpha=0.6, label="corrupted label")
        ax.axvline(0.5, color="k", ls="--", lw=1)
        r = results[name]
        ax.set(
            xlabel="learned weight σ(u)",
            ylabel="training examples",
            title=f"{METHODS[name]}: F1 {r['f1']:.3f}",
        )
        ax.legend()
    acc_ax, f1_ax = axes[1]
    for name in METHODS:
        h = results[name]["history"]
        acc_ax.plot(h["eval_step"], h["acc"], marker=".", label=METHODS[name])
        f1_ax.plot(h["eval_step"], h["f1"], marker=".", label=METHODS[name])
    for key, label in (("baseline_acc", "baseline (all data)"), ("oracle_acc", "oracle (clean)")):
        acc_ax.axhline(results[key], ls="--", lw=1, color="k" if key == "oracle_acc" else "r")
        acc_ax.text(0, results[key], label, va="bottom", fontsize=8)
    acc_ax.set(
        xlabel="hyper-iteration",
        ylabel="test accuracy of the current inner model",
        title="Test accuracy",
    )
    f1_ax.set(
        xlabel="hyper-iteration",
        ylabel="F1 of weight < 1/2 ⇒ corrupted",
        title="Detecting corrupted labels",
        ylim=(0, 1),
    )
    acc_ax.legend()
    f1_ax.legend()
    return _outputs.save_figure(fig, path, dpi=110)


def main(argv=None) -> dict:
    p = _cli.parser("hyper_cleaning", __doc__.splitlines()[0])
    p.add_argument(
        "--hyper-steps",
        type=int,
        default=None,
        help="hypergradient steps per method (default 300, 40 with --quick)",
    )
    p.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="T for the unrolled method (default 100, 50 with --quick)",
    )
    p.add_argument("--lr", type=float, default=None, help="Adam's step on u (default 0.1)")
    p.add_argument(
        "--sizes",
        type=int,
        nargs=3,
        default=SPLIT,
        metavar=("TRAIN", "VAL", "TEST"),
        help="the split of the 10,000 digits (default 4000 2000 4000)",
    )
    p.add_argument("--eval-every", type=int, default=None, help="hyper-steps between evaluations")
    p.add_argument("--checkpoint-every", type=int, default=1, help="hyper-steps between saves")
    p.add_argument("--float64", action="store_true", help="compute in float64 (slower)")
    args = p.parse_args(argv)
    args.hyper_steps = hyper_steps = args.hyper_steps or (40 if args.quick else 300)
    args.inner_steps = inner_steps = args.inner_steps or (50 if args.quick else 100)
    args.lr = lr = args.lr or 0.1
    args.eval_every = eval_every = args.eval_every or max(hyper_steps // 20, 1)
    # More hyper-steps continue a run (the evaluation steps are fixed by --eval-every).
    # x64 on for the implicit method's float64 linear solve; the arrays are float32 unless
    # --float64.
    run = _harness.start(args, may_grow=("hyper_steps",), may_change=("checkpoint_every",))
    dtype = jnp.float64 if args.float64 else jnp.float32
    problem = load(data_dir(args, "mnist"), args.seed, tuple(args.sizes), dtype)

    n = problem.train[0].shape[0]
    clean = 1 - problem.corrupted.astype(dtype)
    _, baseline_acc, _ = train(jnp.ones(n, dtype), problem, RETRAIN_STEPS)
    _, oracle_acc, _ = train(clean, problem, RETRAIN_STEPS)
    results: dict = dict(baseline_acc=float(baseline_acc), oracle_acc=float(oracle_acc))
    for name in METHODS:
        history = hyper_clean(
            name,
            problem,
            hyper_steps,
            run,
            learning_rate=lr,
            num_steps=inner_steps,
            eval_every=eval_every,
            checkpoint_every=args.checkpoint_every,
        )
        results[name] = summarise(history, problem)
        gap = results["oracle_acc"] - results["baseline_acc"]
        results[name]["gap_recovered"] = (
            results[name]["cleaned_acc"] - results["baseline_acc"]
        ) / gap
    results["config"] = dict(
        run.config,
        l2=L2,
        inner_lr=INNER_LR,
        inner_momentum=INNER_MOMENTUM,
        inner_tol=INNER_TOL,
        retrain_steps=RETRAIN_STEPS,
        dtype=str(jnp.dtype(dtype)),
    )
    print_table(results)
    figure = lambda path: plot(results, problem, path)
    return run.finish(results, {"hyper_cleaning.png": figure})


def print_table(results: dict) -> None:
    rows = [
        ("baseline (all data)", f"{results['baseline_acc']:.4f}", "", "", "", "", ""),
        ("oracle (clean only)", f"{results['oracle_acc']:.4f}", "", "", "", "", ""),
    ]
    for name, label in METHODS.items():
        r = results[name]
        rows.append(
            (
                label,
                f"{r['cleaned_acc']:.4f} ({r['cleaned_acc_thresholded']:.4f} thr.)",
                f"{r['gap_recovered']:.2f}",
                f"{r['precision']:.3f}",
                f"{r['recall']:.3f}",
                f"{r['f1']:.3f}",
                f"{r['seconds']:.0f}",
            )
        )
    _console.print_table(
        "Data hyper-cleaning, MNIST, half the training labels corrupted",
        ("model", "test acc", "gap recovered", "precision", "recall", "F1", "seconds"),
        rows,
    )


if __name__ == "__main__":
    _cli.cli(main)
