"""Δ-STN, centred STN and STN against random search and TPE, at the same budget of epochs.

    python -m experiments.delta_stn TASK [--quick] [--out DIR] [--seed S]
        [--resume | --overwrite] [--num-seeds K] [--epochs E]
        [--methods delta centred stn random tpe] [--scale SIGMA] [--scale-lr RATE]

TASK is one of `ridge`, `dropout-regression` (diabetes; closed forms known), `digits-mlp`,
`mnist-mlp`, `mnist-cnn`, or `all`: every task a CPU runs in minutes (`CPU_TASKS`), each in
its own run directory under `--out`, and one table of them all (`table.md`).
"""

import time

import numpy as np

from .. import _atomic, _cli, _console, _distributed, _harness
from ..data import data_dir
from . import _plots
from ._baselines import search
from ._loop import self_tuning
from ._tasks import (
    METHODS,
    TASKS,
    add_method_options,
    dropout_closed_form,
    dropout_exact_val_loss,
    dropout_response_jacobian,
    make_task,
    method_options,
    ridge_closed_form,
    ridge_val_gap,
)


# `all`: the tasks a CPU runs in minutes at `--quick` (mnist-cnn needs a GPU's hours).
CPU_TASKS = ("ridge", "dropout-regression", "digits-mlp", "mnist-mlp")


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
        # The self-tuning methods' perturbation scales and the rates their weights train at.
        **{
            k: np.asarray([r[k] for r in runs]).mean(0)
            for k in ("sigma", "applied")
            if all(k in r for r in runs)
        },
        seeds=runs,
    )


def run_method(task, method: str, seed: int, run: _harness.Run) -> dict:
    if method in ("random", "tpe"):
        r = search(task, method, seed, run)
        return dict(r, seed=seed)
    r = self_tuning(task, method, seed, run)
    checks = {}
    if task.name == "dropout-regression":
        jacobian = dropout_response_jacobian(task, method, r["model"], r["hyperparameters"])
        checks = dict(response_jacobian_relerr=float(jacobian["relerr"]))
    return dict(
        checks,
        seed=seed,
        val_loss=r["val_loss"],
        test_loss=r["test_loss"],
        best_epoch=r["best_epoch"],
        diverged=r["diverged"],
        final_val_loss=r["final_val_loss"],
        final_test_loss=r["final_test_loss"],
        hparams=r["final_hparams"],
        sigma=r["final_sigma"],
        applied=r["final_applied"],
        epochs=np.asarray(r["epoch"]),
        val_curve=np.asarray(r["val_curve"]),
        test_curve=np.asarray(r["test_curve"]),
        train_curve=np.asarray(r["train_curve"]),
        hparams_curve=np.asarray(r["hparams"]),
        sigma_curve=np.asarray(r["sigma"]),
        applied_curve=np.asarray(r["applied"]),
    )


def build_parser():
    p = _cli.parser("delta_stn", __doc__.splitlines()[0])
    p.add_argument("task", choices=[*sorted(TASKS), "all"], nargs="?", default="digits-mlp")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--num-seeds", type=int, default=1, help="seeds seed, seed+1, ...")
    p.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
    p.add_argument(
        "--scale", type=float, default=None, help="the perturbation scale σ at the start"
    )
    p.add_argument(
        "--scale-lr", type=float, default=None, help="RMSprop's rate on σ (0 keeps σ fixed)"
    )
    add_method_options(p)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.task == "all":
        return run_all(args)
    x64 = args.task in ("ridge", "dropout-regression")
    # Each method and seed is a run of its own: more seeds, or other methods, add runs.
    run = _harness.start(args, x64=x64, may_grow=("num_seeds",), may_change=("methods",))
    root = data_dir(args, "mnist") if args.task.startswith("mnist") else None
    seeds = [args.seed + i for i in range(args.num_seeds)]
    overrides = dict(
        epochs=args.epochs, scale=args.scale, scale_lr=args.scale_lr, **method_options(args)
    )
    runs = {m: [] for m in args.methods}
    references = []
    for seed in seeds:
        task = make_task(args.task, seed, args.quick, root, **overrides)
        if args.task == "ridge":
            references.append(ridge_closed_form(task))
        elif args.task == "dropout-regression":
            references.append(dropout_closed_form(task, seed))
        for method in args.methods:
            tic = time.perf_counter()
            r = run_method(task, method, seed, run)
            r["seconds"] = time.perf_counter() - tic
            # The closed-form checks judge the end of the run, not the luckiest epoch.
            if args.task == "ridge":
                r["log_l2_error"] = abs(float(r["hparams"][0]) - references[-1]["log_l2"])
                # Where the validation loss is flat, |log λ − log λ*| says little: the gap in
                # the loss itself is the check (see `flat_log_l2` in the closed form).
                r["val_gap"] = ridge_val_gap(task, float(r["hparams"][0]), references[-1])
            elif args.task == "dropout-regression":
                final = r.get("final_val_loss", r["val_loss"])
                r["val_ratio"] = final / references[-1]["val_loss"]
                r["exact_val_loss"] = dropout_exact_val_loss(task, r["hparams"])
            runs[method].append(r)

    results = {m: _summarise(rs) for m, rs in runs.items()}
    if references:
        results["closed_form"] = _summarise(references)
    task = make_task(args.task, args.seed, args.quick, root, **overrides)
    results["config"] = dict(
        task=args.task,
        quick=args.quick,
        seeds=seeds,
        epochs=task.epochs,
        warmup=task.warmup,
        trial_epochs=task.trial_epochs,
        batch_size=task.batch_size,
        hparam_names=[s.name for s in task.specs],
        recipe=task.recipe,
        general=task.general,
        hyper_step=task.hyper_step,
        step_order=task.step_order,
        rate_caps=[s.upper for s in task.specs if s.name.startswith("dropout")],
    )
    print_table(results)
    if _distributed.is_main_process():
        _atomic.atomic_write(run.path("table.md"), markdown_table(results).encode())
    figure = lambda path: _plots.plot(results, path, METHODS)
    return run.finish(results, {f"delta_stn_{args.task}.png": figure})


def run_all(args) -> dict:
    """Every task of `CPU_TASKS` with the same options, each a run of its own in
    `--out/<task>` (resumed, or overwritten, with the others), then one table of them all."""
    run = _harness.start(args, x64=False, may_grow=("num_seeds",), may_change=("methods",))
    shared = ["--seed", str(args.seed), "--num-seeds", str(args.num_seeds), "--methods"]
    shared += args.methods
    shared += ["--quick"] * args.quick + ["--resume"] * args.resume
    shared += ["--overwrite"] * args.overwrite
    if args.epochs is not None:
        shared += ["--epochs", str(args.epochs)]
    if args.scale is not None:
        shared += ["--scale", str(args.scale)]
    if args.scale_lr is not None:
        shared += ["--scale-lr", str(args.scale_lr)]
    if args.data_dir is not None:
        shared += ["--data-dir", str(args.data_dir)]
    shared += ["--recipe", args.recipe, "--general", args.general, "--hyper-step", args.hyper_step]
    shared += ["--step-order", args.step_order]
    if args.rate_cap is not None:
        shared += ["--rate-cap", str(args.rate_cap)]
    results = {}
    for task in CPU_TASKS:
        _console.console.print(f"== {task} ==")
        results[task] = main([task, "--out", str(run.out / task), *shared])
    results["config"] = dict(tasks=list(CPU_TASKS), quick=args.quick, seeds=args.num_seeds)
    table = all_tasks_table(results)
    if _distributed.is_main_process():
        _atomic.atomic_write(run.path("table.md"), table.encode())
    print(table)
    return run.finish(results)


def all_tasks_table(results: dict) -> str:
    """One Markdown table of every task's methods: validation and test loss (mean ± sd over
    seeds, the mean alone for one seed), and the task's check against its closed form where
    it has one."""
    lines = [
        "| task | method | val loss | test loss | check |",
        "|---|---|---|---|---|",
    ]
    for task in CPU_TASKS:
        for m in METHODS:
            if m not in results[task]:
                continue
            r = results[task][m]
            check = ""
            if task == "ridge":
                check = "val gap " + ", ".join(f"{s['val_gap']:.2%}" for s in r["seeds"])
            elif task == "dropout-regression":
                check = "val / optimum " + ", ".join(f"{s['val_ratio']:.3f}" for s in r["seeds"])
            spread = lambda key: f" ± {r[key + '_sd']:.4f}" if len(r["seeds"]) > 1 else ""
            lines.append(
                f"| {task} | {METHODS[m]} | {r['val_loss']:.4f}{spread('val_loss')} "
                f"| {r['test_loss']:.4f}{spread('test_loss')} | {check} |"
            )
    return "\n".join(lines) + "\n"


def markdown_table(results: dict) -> str:
    """The results as a Markdown table: mean ± sd over seeds, then each seed's value."""
    seeds = results["config"]["seeds"]
    names = results["config"]["hparam_names"]
    lines = [
        "| method | val loss | test loss | per seed (val / test) | hyperparameters (mean) "
        "| σ (mean) | applied (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in [*(m for m in METHODS if m in results), "closed_form"]:
        if m not in results:
            continue
        r = results[m]
        per_seed = ", ".join(f"{s['val_loss']:.4f} / {s['test_loss']:.4f}" for s in r["seeds"])
        hp = ", ".join(f"{n} {v:.3g}" for n, v in zip(names, np.atleast_1d(r["hparams"])))
        sigma, applied = (_values(r.get(k)) for k in ("sigma", "applied"))
        lines.append(
            f"| {METHODS.get(m, 'closed form')} | {r['val_loss']:.4f} ± {r['val_loss_sd']:.4f} "
            f"| {r['test_loss']:.4f} ± {r['test_loss_sd']:.4f} | {per_seed} | {hp} "
            f"| {sigma} | {applied} |"
        )
    return "\n".join(lines) + f"\n\nSeeds {seeds}.\n"


def _values(x) -> str:
    return "–" if x is None else " ".join(f"{v:.3g}" for v in np.atleast_1d(x))


def print_table(results: dict) -> None:
    config = results["config"]
    rows = [
        (
            METHODS.get(m, "closed form"),
            f"{results[m]['val_loss']:.4f} ± {results[m]['val_loss_sd']:.4f}",
            f"{results[m]['test_loss']:.4f} ± {results[m]['test_loss_sd']:.4f}",
            _values(results[m]["hparams"]),
            _values(results[m].get("sigma")),
            _values(results[m].get("applied")),
        )
        for m in [*METHODS, "closed_form"]
        if m in results
    ]
    title = (
        f"{config['task']} ({config['recipe']} recipe): eval-mode loss, mean ± sd over seeds "
        f"{config['seeds']}"
    )
    columns = ("method", "val loss", "test loss", "hyperparameters", "σ", "applied")
    # The table is the run's result: it goes to stdout, the progress bars to stderr.
    _console.print_table(title, columns, rows)


if __name__ == "__main__":
    _cli.cli(main)
