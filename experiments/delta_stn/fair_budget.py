"""The smallest budget of epochs at which a well-tuned plain network is no longer underfitted:
where a comparison of hyperparameter tuners is fair.

    python -m experiments.delta_stn.fair_budget [TASK] [--epochs 10 20 40 80 160]
        [--rates 0 0.1 0.2 0.3 0.5] [--num-seeds 1] [--tolerance 0.02] [--quick]
        [--out DIR] [--seed S] [--resume | --overwrite]

At each budget E of `--epochs` the plain network (general weights only, the task's optimiser
with its learning rate decaying over the E epochs) is trained with every dropout rate of
`--rates` (the same rate in every layer), and also with the classic 0.2 on the inputs and 0.5
on the hidden layers (Srivastava et al. 2014); the *tuned* loss at E is the best of these
validation losses (each at its best epoch), averaged over seeds. The budget is *fair* at the
smallest E whose next budget (the next of `--epochs`) improves the tuned loss by less than
`--tolerance` (relative): there the validation loss has flattened, so more epochs no longer
favour the least regularised setting. TASK defaults to `mnist-mlp`.
"""

import numpy as np

from .. import _cli, _console, _harness, _outputs
from ..data import data_dir
from ._loop import plain_training
from ._tasks import RECIPES, TASKS, make_task


CLASSIC = "0.2 / 0.5"  # input / hidden dropout of Srivastava et al. (2014)


def settings(rates, num_hparams: int) -> dict[str, list[float]]:
    """Every uniform rate of `rates`, and the classic input 0.2 / hidden 0.5 (for networks with
    more than one rate), as one rate per layer."""
    out = {f"{rate:g}": [float(rate)] * num_hparams for rate in rates}
    if num_hparams > 1:
        out[CLASSIC] = [0.2] + [0.5] * (num_hparams - 1)
    return out


def tuned_loss(losses: dict[str, float]) -> tuple[float, str | None]:
    """The best validation loss among the settings, and its setting: a setting that diverged
    (NaN) is no candidate; `(nan, None)` when every one did."""
    finite = {label: loss for label, loss in losses.items() if np.isfinite(loss)}
    if not finite:
        return float("nan"), None
    label = min(finite, key=finite.__getitem__)
    return finite[label], label


def fair_budget(budgets, tuned, tolerance: float) -> int | None:
    """The smallest budget of `budgets` (increasing) whose tuned loss the next budget's improves
    by less than `tolerance` relative, or `None` if every step still improves by more (the
    last budget cannot be judged: it has no next) or a tuned loss on the way is NaN."""
    for e, now, after in zip(budgets, tuned, tuned[1:]):
        if not (np.isfinite(now) and np.isfinite(after)):
            return None  # a budget at which every setting diverged: nothing to judge by
        if after > (1 - tolerance) * now:
            return int(e)
    return None


def main(argv=None) -> dict:
    p = _cli.parser("delta_stn_fair_budget", __doc__.splitlines()[0])
    p.add_argument("task", choices=sorted(TASKS), nargs="?", default="mnist-mlp")
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 20, 40, 80, 160])
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--num-seeds", type=int, default=1, help="seeds seed, seed+1, ...")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="bilevax",
        help="the weights' optimisation settings: the task's own, or the reference code's",
    )
    args = p.parse_args(argv)
    if sorted(set(args.epochs)) != args.epochs or min(args.epochs) < 1:
        raise ValueError(f"`--epochs` must be increasing positive integers, got {args.epochs}.")
    if not all(0 <= rate < 1 for rate in args.rates):
        raise ValueError(f"`--rates` must be dropout rates in [0, 1), got {args.rates}.")
    if args.num_seeds < 1:
        raise ValueError(f"`--num-seeds` must be at least 1, got {args.num_seeds}.")
    run = _harness.start(args, x64=args.task in ("ridge", "dropout-regression"))
    root = data_dir(args, "mnist") if args.task.startswith("mnist") else None
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    cells = []
    for seed in seeds:
        for epochs in args.epochs:
            task = make_task(
                args.task,
                seed,
                args.quick,
                root,
                recipe=args.recipe,
                epochs=epochs,
                trial_epochs=epochs,
            )
            for label, lam in settings(args.rates, len(task.specs)).items():

                def train(task=task, lam=lam, seed=seed, epochs=epochs):
                    val, test, curve = plain_training(task, lam, seed, epochs)
                    return dict(val=val, test=test, curve=np.asarray(curve))

                cell = run.stage(f"s{seed}_e{epochs}_{label.replace(' / ', '-')}", train)
                cells.append(dict(cell, seed=seed, epochs=epochs, setting=label))
    labels = list(settings(args.rates, len(task.specs)))
    mean = {
        (e, label): float(
            np.mean([c["val"] for c in cells if c["epochs"] == e and c["setting"] == label])
        )
        for e in args.epochs
        for label in labels
    }
    tuned, best = zip(
        *(tuned_loss({label: mean[e, label] for label in labels}) for e in args.epochs)
    )
    fair = fair_budget(args.epochs, tuned, args.tolerance)
    rows = [
        (str(e), *(f"{mean[e, label]:.4f}" for label in labels), f"{t:.4f}", b or "all diverged")
        for e, t, b in zip(args.epochs, tuned, best)
    ]
    _console.print_table(
        f"Best validation loss of the plain network (mean over {len(seeds)} seed(s))",
        ("epochs", *labels, "tuned", "best setting"),
        rows,
    )
    _console.console.print(
        f"Fair budget (next budget improves the tuned loss by < {args.tolerance:.0%}): "
        + (f"{fair} epochs" if fair is not None else "not reached within --epochs")
    )
    results = dict(
        cells=cells,
        tuned=list(tuned),
        best_setting=list(best),
        fair_epochs=fair,
        config=dict(
            task=args.task,
            recipe=args.recipe,
            epochs=args.epochs,
            seeds=seeds,
            tolerance=args.tolerance,
        ),
    )
    return run.finish(results, {f"fair_budget_{args.task}.png": lambda path: plot(results, path)})


def plot(results: dict, path):
    plt = _outputs.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    epochs = results["config"]["epochs"]
    for label in dict.fromkeys(c["setting"] for c in results["cells"]):
        curve = [
            np.mean(
                [c["val"] for c in results["cells"] if c["epochs"] == e and c["setting"] == label]
            )
            for e in epochs
        ]
        ax.plot(epochs, curve, marker="o", lw=1, label=f"dropout {label}")
    ax.plot(epochs, results["tuned"], color="k", lw=2.5, alpha=0.5, label="tuned (best)")
    if results["fair_epochs"] is not None:
        ax.axvline(results["fair_epochs"], color="k", ls="--", lw=1, label="fair budget")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="epochs (budget of one training run)",
        ylabel="best validation loss",
        title=f"{results['config']['task']}: plain network",
    )
    ax.legend(fontsize=8)
    return _outputs.save_figure(fig, path)


if __name__ == "__main__":
    _cli.cli(main)
