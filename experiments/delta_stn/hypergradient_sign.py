r"""Which way should the rates go? Δ-STN's hypergradient at a mid-run checkpoint against a
finite-difference retrain (issue 26: Δ-STN lowers the dropout rates; is that the
hypergradient's doing, and is the hypergradient right?).

    python -m experiments.delta_stn.hypergradient_sign [TASK] [--quick] [--out DIR]
        [--seed S] [--recipe bilevax|reference] [--mid-epoch E] [--step D]
        [--retrain-epochs R] [--draws K] [--resume | --overwrite]

1. Δ-STN (Algorithm 1) trains for `--mid-epoch` epochs (default: half the task's).
2. Its hypergradient with respect to each rate's unconstrained value $u_i$: the gradient of
   `bilevax.nn.hyper_loss` (no entropy term) on the whole validation set, averaged over
   `--draws` perturbation draws.
3. The finite difference: from the checkpoint's general weights, the plain network is
   retrained for `--retrain-epochs` epochs at the rates $\operatorname{constrain}(u \pm D e_i)$
   (the same batches and dropout keys for $+$ and $-$), and
   $(E_+ - E_-) / 2D$ of the eval-mode validation loss at the end is the slope the
   hypergradient estimates, over that horizon.

A negative slope means "raise this rate"; the table gives both signs per rate.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import bilevax.nn as bnn

from .. import _cli, _console, _harness
from ..data import data_dir
from ._loop import plain_training, self_tuning
from ._tasks import TASKS, add_method_options, make_task, method_options


def hypergradient(task, model, hparams, draws: int, seed: int) -> np.ndarray:
    """Δ-STN's λ-gradient of the validation loss (no entropy term), averaged over draws."""

    def loss(values, key, model, hparams, x, y):
        hp = eqx.tree_at(lambda h: h.values, hparams, values)
        return bnn.hyper_loss(
            "delta",
            task.apply,
            task.val_loss,
            model,
            hp,
            x,
            y,
            key,
            entropy_weight=0.0,
            linearize=task.hyper_step == "linearized",
        )

    keys = jax.random.split(jax.random.key(seed + 100), draws)
    # The model and the data are arguments, not constants XLA would try to fold.
    per_draw = eqx.filter_jit(
        eqx.filter_vmap(eqx.filter_grad(loss), in_axes=(None, 0, None, None, None, None))
    )
    grads = per_draw(hparams.values, keys, model, hparams, *task.val)
    return np.asarray(grads.mean(0))


def finite_difference(task, model, hparams, step: float, epochs: int, seed: int) -> list[dict]:
    """Per rate: the validation loss after retraining at u ± step e_i, and the slope."""
    rows = []
    u = np.asarray(hparams.values)
    for i, spec in enumerate(task.specs):
        losses = []
        for sign in (1.0, -1.0):
            shifted = jnp.asarray(u + sign * step * np.eye(len(u))[i], hparams.values.dtype)
            lam = hparams.constrain(shifted, train=True)
            _, _, curve = plain_training(task, lam, seed, epochs, model=model)
            losses.append(curve[-1])
        rows.append(
            dict(
                name=spec.name,
                rate=float(hparams.value()[i]),
                plus=losses[0],
                minus=losses[1],
                slope=(losses[0] - losses[1]) / (2 * step),
            )
        )
    return rows


def main(argv=None) -> dict:
    p = _cli.parser("delta_stn_hypergradient_sign", __doc__.splitlines()[0])
    p.add_argument("task", choices=sorted(TASKS), nargs="?", default="digits-mlp")
    p.add_argument("--mid-epoch", type=int, default=None, help="default: half the epochs")
    p.add_argument("--step", type=float, default=0.3, help="D, in the unconstrained scale")
    p.add_argument("--retrain-epochs", type=int, default=5)
    p.add_argument("--draws", type=int, default=32, help="perturbation draws to average")
    add_method_options(p)
    args = p.parse_args(argv)
    if not args.step > 0:
        raise ValueError(f"`--step` must be positive, got {args.step}.")
    run = _harness.start(args, x64=args.task in ("ridge", "dropout-regression"))
    root = data_dir(args, "mnist") if args.task.startswith("mnist") else None
    task = make_task(args.task, args.seed, args.quick, root, **method_options(args))
    mid = args.mid_epoch or task.epochs // 2
    task = make_task(args.task, args.seed, args.quick, root, epochs=mid, **method_options(args))
    r = self_tuning(task, "delta", args.seed, run, name=f"delta_{args.seed}_to_{mid}")
    model, hparams = r["model"], r["hyperparameters"]
    hypergrad = run.stage(
        "hypergradient", lambda: hypergradient(task, model, hparams, args.draws, args.seed)
    )
    rows = run.stage(
        "finite_difference",
        lambda: finite_difference(task, model, hparams, args.step, args.retrain_epochs, args.seed),
    )
    for row, g in zip(rows, np.asarray(hypergrad)):
        row["hypergradient"] = float(g)
        row["agree"] = bool(np.sign(g) == np.sign(row["slope"]))
    _console.print_table(
        f"{args.task} at epoch {mid} ({task.recipe} recipe): Δ-STN's hypergradient against a "
        f"{args.retrain_epochs}-epoch retrain at u ± {args.step}",
        ("rate", "value", "Δ-STN hypergradient", "finite difference", "same sign"),
        [
            (
                row["name"],
                f"{row['rate']:.4f}",
                f"{row['hypergradient']:+.4f}",
                f"{row['slope']:+.4f}",
                "yes" if row["agree"] else "no",
            )
            for row in rows
        ],
    )
    results = dict(rows=rows, mid_epoch=mid, step=args.step, retrain_epochs=args.retrain_epochs)
    return run.finish(results)


if __name__ == "__main__":
    _cli.cli(main)
