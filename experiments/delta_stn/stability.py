"""Stability of STN, centred STN and Δ-STN across learning rates (Bae & Grosse 2020's claim
that Δ-STN trains more stably).

    python -m experiments.delta_stn.stability [TASK] [--quick] [--out DIR] [--seed S]
        [--lrs 0.03 0.1 0.3] [--hyper-lrs 0.003 0.01 0.03] [--epochs E]
        [--resume | --overwrite]

Every variant is trained at every (weight learning rate, hyperparameter learning rate) pair of
the grid, from the same seed, with the task's other settings unchanged. A run has *diverged*
when its eval-mode validation loss ends non-finite; the table counts diverged runs per variant
and gives each run's final and best validation loss. TASK defaults to `digits-mlp`.
"""

import itertools

import numpy as np

from .. import _cli, _console, _harness, _outputs
from ..data import data_dir
from ._loop import self_tuning
from ._tasks import TASKS, add_method_options, make_task, method_options


VARIANTS = {"delta": "Δ-STN", "centred": "centred STN", "stn": "STN"}


def run_grid(
    task_name: str,
    seed: int,
    quick: bool,
    lrs,
    hyper_lrs,
    run,
    epochs=None,
    data_dir=None,
    options: dict | None = None,
) -> dict:
    """Each variant at each `(lr, hyper_lr)` pair: `{variant: [cell, ...]}`, a cell holding
    the rates, whether the run diverged, and its final and best validation losses."""
    overrides = dict(epochs=epochs, **(options or {}))
    cells = {variant: [] for variant in VARIANTS}
    for lr, hyper_lr in itertools.product(lrs, hyper_lrs):
        task = make_task(task_name, seed, quick, data_dir, lr=lr, hyper_lr=hyper_lr, **overrides)
        for variant in VARIANTS:
            name = f"{variant}_{seed}_lr{lr:g}_hlr{hyper_lr:g}"
            r = self_tuning(task, variant, seed, run, name=name)
            cells[variant].append(
                dict(
                    lr=lr,
                    hyper_lr=hyper_lr,
                    diverged=r["diverged"],
                    final_val_loss=r["final_val_loss"],
                    best_val_loss=r["val_loss"],
                )
            )
    return cells


def summarise(cells: dict) -> dict:
    """Per variant: the runs that diverged, and the median and worst final validation loss
    over the runs that did not."""
    summary = {}
    for variant, runs in cells.items():
        finite = [c["final_val_loss"] for c in runs if not c["diverged"]]
        summary[variant] = dict(
            runs=len(runs),
            diverged=sum(c["diverged"] for c in runs),
            median_final_val_loss=float(np.median(finite)) if finite else float("nan"),
            worst_final_val_loss=float(np.max(finite)) if finite else float("nan"),
        )
    return summary


def plot(cells: dict, lrs, hyper_lrs, path):
    plt = _outputs.pyplot()
    fig, axes = plt.subplots(1, len(VARIANTS), figsize=(5 * len(VARIANTS), 4.2))
    finite = [c["final_val_loss"] for runs in cells.values() for c in runs if not c["diverged"]]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    for ax, (variant, label) in zip(axes, VARIANTS.items()):
        grid = np.full((len(lrs), len(hyper_lrs)), np.nan)
        for c in cells[variant]:
            grid[lrs.index(c["lr"]), hyper_lrs.index(c["hyper_lr"])] = c["final_val_loss"]
        ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, origin="lower")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="w", fontsize=9)
            else:  # an empty (white) cell
                ax.text(j, i, "diverged", ha="center", va="center", color="crimson", fontsize=9)
        ax.set(
            xticks=range(len(hyper_lrs)),
            xticklabels=[f"{h:g}" for h in hyper_lrs],
            yticks=range(len(lrs)),
            yticklabels=[f"{lr:g}" for lr in lrs],
            xlabel="hyperparameter learning rate",
            ylabel="weight learning rate",
            title=f"{label}: final validation loss",
        )
    return _outputs.save_figure(fig, path)


def print_table(cells: dict, summary: dict) -> None:
    rows = []
    for variant, label in VARIANTS.items():
        s = summary[variant]
        per_cell = "  ".join(
            "div" if c["diverged"] else f"{c['final_val_loss']:.3f}" for c in cells[variant]
        )
        rows.append(
            (
                label,
                f"{s['diverged']} / {s['runs']}",
                f"{s['median_final_val_loss']:.4f}",
                f"{s['worst_final_val_loss']:.4f}",
                per_cell,
            )
        )
    _console.print_table(
        "Stability over the learning-rate grid (final eval-mode validation loss)",
        ("variant", "diverged", "median final val", "worst final val",
         "per cell (lr-major, hyper lr-minor)"),
        rows,
    )  # fmt: skip


def main(argv=None) -> dict:
    p = _cli.parser("delta_stn_stability", __doc__.splitlines()[0])
    p.add_argument("task", choices=sorted(TASKS), nargs="?", default="digits-mlp")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    p.add_argument("--hyper-lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03])
    p.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
    add_method_options(p)
    args = p.parse_args(argv)
    for option, rates in (("--lrs", args.lrs), ("--hyper-lrs", args.hyper_lrs)):
        if not all(rate > 0 for rate in rates):
            raise ValueError(f"`{option}` must be positive, got {rates}.")
    x64 = args.task in ("ridge", "dropout-regression")
    run = _harness.start(args, x64=x64)
    root = data_dir(args, "mnist") if args.task.startswith("mnist") else None
    cells = run_grid(
        args.task,
        args.seed,
        args.quick,
        args.lrs,
        args.hyper_lrs,
        run,
        args.epochs,
        root,
        method_options(args),
    )
    summary = summarise(cells)
    print_table(cells, summary)
    results = dict(cells=cells, summary=summary)
    figure = lambda path: plot(cells, list(args.lrs), list(args.hyper_lrs), path)
    return run.finish(results, {f"stability_{args.task}.png": figure})


if __name__ == "__main__":
    _cli.cli(main)
