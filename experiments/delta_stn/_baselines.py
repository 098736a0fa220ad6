"""Random search and TPE (optuna) at the self-tuning runs' budget of epochs: each trial trains
the plain network (general weights only) for `task.trial_epochs` epochs at fixed
hyperparameters."""

import numpy as np
import optuna

from .. import _harness, _optuna
from ._loop import Task, forget_compiled, plain_training


# The most trials a search on a budget of seconds may run (the budget stops it long before).
MAX_TIMED_TRIALS = 10_000


def search(
    task: Task,
    method: str,
    seed: int,
    run: _harness.Run,
    *,
    budget_seconds: float | None = None,
    startup: int | None = None,
) -> dict:
    """Random search or TPE over `task.search`: `task.epochs // task.trial_epochs` trials of
    `method` (`"random"` or `"tpe"`), or, given `budget_seconds`, as many trials as start
    within that many seconds (compilation included); each trial checkpointed (a resumed run
    replays the finished trials to the sampler, see `experiments._optuna`).

    **Returns:**

    The best trial's `val_loss`, `test_loss` and `hparams`, every trial, and `elapsed` and
    `best_so_far` per trial (the seconds at its end; the best validation loss by then).
    """
    if budget_seconds is None:
        trials = max(1, task.epochs // task.trial_epochs)
    else:
        trials = MAX_TIMED_TRIALS
        forget_compiled()
    distributions = {
        f"h{i}": optuna.distributions.FloatDistribution(lo, hi, log=log)
        for i, (lo, hi, log) in enumerate(task.search)
    }
    # optuna's default of 10 random start-up trials would leave TPE nothing to model at small
    # budgets: a third of the trials, at least 2.
    if startup is None:
        startup = min(10, max(2, trials // 3))
    sampler = _optuna.sampler(method, seed + (10_000 if method == "tpe" else 0), startup)

    def objective(k, params):
        lam = [
            float(np.floor(v)) if spec.integer else v
            for spec, v in zip(task.specs, params.values())
        ]
        val, test, curve = plain_training(task, lam, seed * 1000 + k, task.trial_epochs)
        told = val if np.isfinite(val) else float("inf")
        return told, dict(hparams=lam, val_loss=val, test_loss=test, curve=curve)

    description = f"{task.name} {method} s{seed}"
    done = _optuna.search(
        run,
        f"{method}_{seed}",
        trials,
        sampler,
        distributions,
        objective,
        description=description,
        budget_seconds=budget_seconds,
    )["trials"]
    vals = np.asarray([t["val_loss"] for t in done])
    vals = np.where(np.isfinite(vals), vals, np.inf)
    best = int(np.argmin(vals))
    epochs = task.trial_epochs * np.arange(1, len(done) + 1)
    return dict(
        val_loss=float(vals[best]),
        test_loss=float(done[best]["test_loss"]),
        hparams=np.asarray(done[best]["hparams"]),
        trials=done,
        epochs=epochs,
        elapsed=np.asarray([t["elapsed"] for t in done]),
        best_so_far=np.minimum.accumulate(vals),
    )
