"""The best validation loss reached against wall-clock time: Δ-STN, centred STN and STN against
random search and TPE given the same seconds (Bae & Grosse 2020's figure, on our data).

    python -m experiments.delta_stn.time_budget [TASK] [--quick] [--num-seeds 5] [--seed S]
        [--epochs E] [--trial-epochs E] [--budget-factor 1.0] [--tpe-startup 5]
        [--out DIR] [--resume | --overwrite]

Per seed (its own split and initialisation, shared by every method), each self-tuning
variant trains for the task's epochs and records the wall-clock at the end of every epoch,
compilation included. The seed's budget is the longest of the three runs (times
`--budget-factor`); random search and TPE then train plain networks for `--trial-epochs`
epochs each, trial after trial, until the budget is spent, each search paying for its own
compilation. A trial counts from the moment it ends: one still running when the budget runs
out counts for nothing. The methods run one after another in one process, so they share the
machine alike; on a busy machine pin the process to a core (`taskset -c 1 python -m ...`).

The table gives, per method, the best validation loss reached by 25 %, 50 % and 100 % of the
budget (mean ± sd over seeds; "–" while some seed has nothing finished yet), and the paired
comparison at the end of the budget: each method's best validation loss and the test loss at
that point, against Δ-STN's on the same seeds (mean difference, wins, Wilcoxon signed-rank
and paired t-test p-values).
"""

import numpy as np
import scipy.stats

from .. import _atomic, _cli, _distributed, _harness, _outputs
from ..data import data_dir
from ._baselines import search
from ._loop import self_tuning
from ._tasks import METHODS, TASKS, add_method_options, make_task, method_options


SELF_TUNING = ("delta", "centred", "stn")
FRACTIONS = (0.25, 0.5, 1.0)  # of the budget


def best_by(seconds, val, test, t: float) -> tuple[float, float]:
    """The best validation loss among the points (epochs or trials) that ended by `t` seconds,
    and the test loss at that point: `(nan, nan)` when none had, or none was finite."""
    seconds, val, test = map(np.asarray, (seconds, val, test))
    done = (seconds <= t) & np.isfinite(val)
    if not done.any():
        return float("nan"), float("nan")
    i = np.flatnonzero(done)[np.argmin(val[done])]
    return float(val[i]), float(test[i])


def _best_by(timeline: dict, t: float) -> tuple[float, float]:
    return best_by(timeline["seconds"], timeline["val"], timeline["test"], t)


def timeline(task, method: str, seed: int, run: _harness.Run, budget: float | None, startup):
    r"""`seconds`, `val` and `test` per epoch of a self-tuning run, or per trial of a search,
    and `hparams`: the self-tuning run's at its end (with its perturbation scales `sigma` and
    the `applied` rates $E[\operatorname{constrain}(u + \sigma z)]$), or the best trial's."""
    if method in SELF_TUNING:
        r = self_tuning(task, method, seed, run)
        return dict(
            seconds=list(r["seconds"]),
            val=list(r["val_curve"]),
            test=list(r["test_curve"]),
            hparams=np.asarray(r["final_hparams"]).tolist(),
            sigma=np.asarray(r["final_sigma"]).tolist(),
            applied=np.asarray(r["final_applied"]).tolist(),
        )
    r = search(task, method, seed, run, budget_seconds=budget, startup=startup)
    trials = r["trials"]
    return dict(
        seconds=[t["elapsed"] for t in trials],
        val=[t["val_loss"] for t in trials],
        test=[t["test_loss"] for t in trials],
        hparams=np.asarray(r["hparams"]).tolist(),
    )


def run_seed(task, seed: int, run: _harness.Run, factor: float, startup: int) -> dict:
    """Every method on one seed: `{method: timeline, "budget": seconds}`."""
    out = {m: timeline(task, m, seed, run, None, startup) for m in SELF_TUNING}
    budget = factor * max(out[m]["seconds"][-1] for m in SELF_TUNING)
    for method in ("random", "tpe"):
        out[method] = timeline(task, method, seed, run, budget, startup)
    out["budget"] = budget
    return out


def summarise(per_seed: list[dict], fractions=FRACTIONS) -> dict:
    """Per method: the best validation loss (and its test loss) by each of `fractions` of the
    budget, per seed, with mean and sd, and paired differences from Δ-STN's there."""
    summary = {}
    for method in METHODS:
        by_fraction = {}
        for f in fractions:
            pairs = [_best_by(s[method], f * s["budget"]) for s in per_seed]
            val = np.asarray([p[0] for p in pairs])
            test = np.asarray([p[1] for p in pairs])
            complete = bool(np.isfinite(val).all())
            by_fraction[f"{f:g}"] = dict(
                val=val.tolist(),
                test=test.tolist(),
                val_mean=float(val.mean()) if complete else float("nan"),
                val_sd=float(val.std(ddof=1)) if complete and len(val) > 1 else float("nan"),
                test_mean=float(test.mean()) if complete else float("nan"),
            )
        evaluations = [len(s[method]["seconds"]) for s in per_seed]
        # The first epoch or trial's end: mostly compilation at CPU sizes.
        first = [s[method]["seconds"][0] / s["budget"] for s in per_seed]
        mean = lambda key: np.mean([s[method][key] for s in per_seed], axis=0).tolist()
        summary[method] = dict(
            by_fraction=by_fraction, evaluations=evaluations, first=first, hparams=mean("hparams")
        )
        if method in SELF_TUNING:
            summary[method] |= dict(sigma=mean("sigma"), applied=mean("applied"))
    reference = summary["delta"]["by_fraction"]
    for method in METHODS:
        if method == "delta":
            continue
        summary[method]["paired"] = {}
        for f in fractions:
            ours, theirs = summary[method]["by_fraction"][f"{f:g}"], reference[f"{f:g}"]
            summary[method]["paired"][f"{f:g}"] = dict(
                val=paired(np.asarray(ours["val"]), np.asarray(theirs["val"])),
                test=paired(np.asarray(ours["test"]), np.asarray(theirs["test"])),
            )
    return summary


def paired(values: np.ndarray, reference: np.ndarray) -> dict:
    """`values − reference` on the same seeds: mean, sd, how often `values` is lower (better),
    and two-sided p-values of the Wilcoxon signed-rank and paired t-tests (NaN when some seed
    has no value, or with fewer than two seeds)."""
    diff = values - reference
    if not np.isfinite(diff).all() or len(diff) < 2:
        nan = float("nan")
        return dict(mean=nan, sd=nan, wins=0, seeds=len(diff), wilcoxon_p=nan, t_p=nan)
    if np.allclose(diff, diff[0], rtol=1e-9, atol=1e-15):
        # No spread: the t statistic is 0/0 or ±inf, and every seed has the same sign.
        zero = abs(diff[0]) <= 1e-15
        wilcoxon_p = 1.0 if zero else float(scipy.stats.wilcoxon(diff).pvalue)
        t_p = 1.0 if zero else 0.0
    else:
        wilcoxon_p = float(scipy.stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
        t_p = float(scipy.stats.ttest_rel(values, reference).pvalue)
    return dict(
        mean=float(diff.mean()),
        sd=float(diff.std(ddof=1)),
        wins=int(np.sum(diff < 0)),
        seeds=len(diff),
        wilcoxon_p=wilcoxon_p,
        t_p=t_p,
    )


def _cell(entry: dict) -> str:
    if not np.isfinite(entry["val_mean"]):
        return "–"
    sd = f" ± {entry['val_sd']:.4f}" if np.isfinite(entry["val_sd"]) else ""
    return f"{entry['val_mean']:.4f}{sd}"


def markdown_table(summary: dict, budgets: list[float], paired_at=(1.0,)) -> str:
    """The budget table, and the paired comparison at the fractions `paired_at` of the
    budget, as Markdown."""
    lines = [
        f"Budget per seed: {', '.join(f'{b:.0f}' for b in budgets)} s.",
        "",
        "| method | first result at | best val loss by 25 % | by 50 % "
        "| by 100 % of the budget | test loss at it | epochs or trials | hyperparameters "
        "| σ | applied |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    values = lambda xs: ", ".join(f"{x:.3g}" for x in xs)
    for method, label in METHODS.items():
        s = summary[method]
        end = s["by_fraction"]["1"]
        test = f"{end['test_mean']:.4f}" if np.isfinite(end["test_mean"]) else "–"
        # The searches train at their rates: no perturbation, applied = reported.
        sigma, applied = (values(s[k]) if k in s else "–" for k in ("sigma", "applied"))
        lines.append(
            f"| {label} | {np.mean(s['first']):.0%} | {_cell(s['by_fraction']['0.25'])} "
            f"| {_cell(s['by_fraction']['0.5'])} "
            f"| {_cell(end)} | {test} | {', '.join(map(str, s['evaluations']))} "
            f"| {values(s['hparams'])} | {sigma} | {applied} |"
        )
    lines += [
        "",
        "| method − Δ-STN, same seeds | at | val loss: mean ± sd | better on | Wilcoxon p "
        "| paired t p | test loss: mean ± sd | better on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, label in METHODS.items():
        for f in paired_at:
            if method == "delta":
                continue
            v, t = (summary[method]["paired"][f"{f:g}"][k] for k in ("val", "test"))
            if not np.isfinite(v["mean"]):
                continue
            lines.append(
                f"| {label} | {f:.0%} | {v['mean']:+.4f} ± {v['sd']:.4f} | {v['wins']} / "
                f"{v['seeds']} | {v['wilcoxon_p']:.3g} | {v['t_p']:.3g} "
                f"| {t['mean']:+.4f} ± {t['sd']:.4f} | {t['wins']} / {t['seeds']} |"
            )
    return "\n".join(lines) + "\n"


def plot(per_seed: list[dict], path, title: str):
    """Best validation loss so far against the fraction of each seed's budget: the mean over
    seeds (from where every seed has a value), shaded from the best seed to the worst."""
    plt = _outputs.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = np.linspace(0, 1, 201)[1:]
    for method, label in METHODS.items():
        curves = np.asarray(
            [[_best_by(s[method], f * s["budget"])[0] for f in grid] for s in per_seed]
        )
        complete = np.isfinite(curves).all(axis=0)
        (line,) = ax.plot(grid[complete], curves.mean(0)[complete], label=label)
        ax.fill_between(
            grid[complete],
            curves.min(0)[complete],
            curves.max(0)[complete],
            color=line.get_color(),
            alpha=0.12,
        )
    budget = np.mean([s["budget"] for s in per_seed])
    ax.set(
        xlabel=f"wall-clock, fraction of the budget (mean budget {budget:.0f} s)",
        ylabel="best validation loss so far",
        yscale="log",
        title=f"{title}: {len(per_seed)} seeds, mean (line) and range (band)",
    )
    ax.legend()
    return _outputs.save_figure(fig, path)


def main(argv=None) -> dict:
    p = _cli.parser("delta_stn_time_budget", __doc__.splitlines()[0])
    p.add_argument("task", choices=sorted(TASKS), nargs="?", default="digits-mlp")
    p.add_argument("--num-seeds", type=int, default=5, help="seeds seed, seed+1, ...")
    p.add_argument("--epochs", type=int, default=None, help="the self-tuning runs' epochs")
    p.add_argument("--trial-epochs", type=int, default=None, help="epochs of one trial")
    p.add_argument("--budget-factor", type=float, default=1.0)
    p.add_argument("--tpe-startup", type=int, default=5, help="TPE's random first trials")
    add_method_options(p)
    args = p.parse_args(argv)
    if args.num_seeds < 1:
        raise ValueError(f"`--num-seeds` must be at least 1, got {args.num_seeds}.")
    if not args.budget_factor > 0:
        raise ValueError(f"`--budget-factor` must be positive, got {args.budget_factor}.")
    run = _harness.start(args, x64=args.task in ("ridge", "dropout-regression"))
    root = data_dir(args, "mnist") if args.task.startswith("mnist") else None
    overrides = dict(epochs=args.epochs, trial_epochs=args.trial_epochs, **method_options(args))
    per_seed = []
    for seed in range(args.seed, args.seed + args.num_seeds):
        task = make_task(args.task, seed, args.quick, root, **overrides)
        per_seed.append(run_seed(task, seed, run, args.budget_factor, args.tpe_startup))
    # Paired at the self-tuning runs' own time (where they stop) and at the end of the budget.
    equal_time = min(1.0, 1 / args.budget_factor)
    summary = summarise(per_seed, sorted({*FRACTIONS, equal_time}))
    budgets = [s["budget"] for s in per_seed]
    table = markdown_table(summary, budgets, sorted({equal_time, 1.0}))
    print(table)
    if _distributed.is_main_process():
        _atomic.atomic_write(run.path("table.md"), table.encode())
    task = make_task(args.task, args.seed, args.quick, root, **overrides)
    results = dict(
        summary=summary,
        per_seed=per_seed,
        config=dict(
            task=args.task,
            epochs=task.epochs,
            trial_epochs=task.trial_epochs,
            budget_factor=args.budget_factor,
            seeds=list(range(args.seed, args.seed + args.num_seeds)),
        ),
    )
    figure = lambda path: plot(per_seed, path, args.task)
    return run.finish(results, {f"delta_stn_time_{args.task}.png": figure})


if __name__ == "__main__":
    _cli.cli(main)
