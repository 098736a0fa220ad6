"""Δ-STN, centred STN and STN against random search and TPE, at the same budget of epochs.

    python -m experiments.delta_stn TASK [--quick] [--out DIR] [--seed S] [--resume]
        [--num-seeds K] [--epochs E] [--methods delta centred stn random tpe]

TASK is one of `ridge`, `dropout-regression` (diabetes; closed forms known), `digits-mlp`,
`mnist-mlp`, `mnist-cnn`.
"""

import time

import jax
import numpy as np
import rich.console

from .. import _common
from . import _plots
from ._loop import self_tuning
from ._search import search
from ._tasks import (
    TASKS,
    dropout_closed_form,
    dropout_exact_val_loss,
    make_task,
    ridge_closed_form,
)


METHODS = {
    "delta": "Δ-STN",
    "centred": "centred STN",
    "stn": "STN",
    "random": "random search",
    "tpe": "TPE",
}


def _summarise(runs: list[dict]) -> dict:
    val = np.asarray([r["val_loss"] for r in runs])
    test = np.asarray([r["test_loss"] for r in runs])
    hparams = np.asarray([r["hparams"] for r in runs])
    return dict(
        val_loss=float(val.mean()),
        val_loss_sd=float(val.std(ddof=1)) if len(runs) > 1 else 0.0,
        test_loss=float(test.mean()),
        test_loss_sd=float(test.std(ddof=1)) if len(runs) > 1 else 0.0,
        hparams=hparams.mean(0),
        seeds=runs,
    )


def run_method(task, method: str, seed: int, ckpt: _common.Checkpoints) -> dict:
    if method in ("random", "tpe"):
        r = search(task, method, seed, ckpt)
        return dict(r, seed=seed)
    r = self_tuning(task, method, seed, ckpt)
    return dict(
        seed=seed,
        val_loss=r["val_loss"],
        test_loss=r["test_loss"],
        best_epoch=r["best_epoch"],
        diverged=r["diverged"],
        final_val_loss=r["final_val_loss"],
        final_test_loss=r["final_test_loss"],
        hparams=r["final_hparams"],
        sigma=r["final_sigma"],
        epochs=np.asarray(r["epoch"]),
        val_curve=np.asarray(r["val_curve"]),
        test_curve=np.asarray(r["test_curve"]),
        train_curve=np.asarray(r["train_curve"]),
        hparams_curve=np.asarray(r["hparams"]),
        sigma_curve=np.asarray(r["sigma"]),
    )


def main(argv=None) -> dict:
    p = _common.parser("delta_stn", __doc__.splitlines()[0])
    p.add_argument("task", choices=sorted(TASKS), nargs="?", default="digits-mlp")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--num-seeds", type=int, default=1, help="seeds seed, seed+1, ...")
    p.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
    args = p.parse_args(argv)
    x64 = args.task in ("ridge", "dropout-regression")
    out = _common.setup(args, x64=x64)
    ckpt = _common.Checkpoints(out, args.resume)
    data_dir = _common.data_dir(args) if args.task.startswith("mnist") else None
    start = time.perf_counter()
    seeds = [args.seed + i for i in range(args.num_seeds)]
    runs = {m: [] for m in args.methods}
    references = []
    for seed in seeds:
        task = make_task(args.task, seed, args.quick, data_dir, epochs=args.epochs)
        if args.task == "ridge":
            references.append(ridge_closed_form(task))
        elif args.task == "dropout-regression":
            references.append(dropout_closed_form(task, seed))
        for method in args.methods:
            tic = time.perf_counter()
            r = run_method(task, method, seed, ckpt)
            r["seconds"] = time.perf_counter() - tic
            # The closed-form checks judge the end of the run, not the luckiest epoch.
            if args.task == "ridge":
                r["log_l2_error"] = abs(float(r["hparams"][0]) - references[-1]["log_l2"])
            elif args.task == "dropout-regression":
                final = r.get("final_val_loss", r["val_loss"])
                r["val_ratio"] = final / references[-1]["val_loss"]
                r["exact_val_loss"] = dropout_exact_val_loss(task, r["hparams"])
            runs[method].append(r)

    results = {m: _summarise(rs) for m, rs in runs.items()}
    if references:
        results["closed_form"] = _summarise(references)
    task = make_task(args.task, args.seed, args.quick, data_dir, epochs=args.epochs)
    results["config"] = dict(
        task=args.task,
        quick=args.quick,
        seeds=seeds,
        epochs=task.epochs,
        warmup=task.warmup,
        trial_epochs=task.trial_epochs,
        batch_size=task.batch_size,
        hparam_names=[s.name for s in task.specs],
        device=str(jax.devices()[0]),
        seconds=time.perf_counter() - start,
    )
    print_table(results)
    (out / "table.md").write_text(markdown_table(results))
    figure = out / f"delta_stn_{args.task}.png"
    _plots.plot(results, figure, METHODS)
    path = _common.write_results(out, results)
    _common.console.print(f"Wrote {path} and {figure}")
    return results


def markdown_table(results: dict) -> str:
    """The results as a Markdown table: mean ± sd over seeds, then each seed's value."""
    seeds = results["config"]["seeds"]
    names = results["config"]["hparam_names"]
    lines = [
        "| method | val loss | test loss | per seed (val / test) | hyperparameters (mean) |",
        "|---|---|---|---|---|",
    ]
    for m in [*(m for m in METHODS if m in results), "closed_form"]:
        if m not in results:
            continue
        r = results[m]
        per_seed = ", ".join(f"{s['val_loss']:.4f} / {s['test_loss']:.4f}" for s in r["seeds"])
        hp = ", ".join(f"{n} {v:.3g}" for n, v in zip(names, np.atleast_1d(r["hparams"])))
        lines.append(
            f"| {METHODS.get(m, 'closed form')} | {r['val_loss']:.4f} ± {r['val_loss_sd']:.4f} "
            f"| {r['test_loss']:.4f} ± {r['test_loss_sd']:.4f} | {per_seed} | {hp} |"
        )
    return "\n".join(lines) + f"\n\nSeeds {seeds}.\n"


def print_table(results: dict) -> None:
    from rich.table import Table

    config = results["config"]
    table = Table(title=f"{config['task']}: eval-mode loss, mean ± sd over seeds {config['seeds']}")
    for column in ("method", "val loss", "test loss", "hyperparameters (mean)"):
        table.add_column(column, justify="left" if column == "method" else "right")
    names = [*(m for m in METHODS if m in results), "closed_form"]
    for m in names:
        if m not in results:
            continue
        r = results[m]
        table.add_row(
            METHODS.get(m, "closed form"),
            f"{r['val_loss']:.4f} ± {r['val_loss_sd']:.4f}",
            f"{r['test_loss']:.4f} ± {r['test_loss_sd']:.4f}",
            " ".join(f"{v:.3g}" for v in np.atleast_1d(r["hparams"])),
        )
    # The table is the run's result: it goes to stdout, the progress bars to stderr.
    rich.console.Console().print(table)


if __name__ == "__main__":
    main()
