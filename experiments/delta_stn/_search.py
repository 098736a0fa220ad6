"""Random search and TPE (optuna) at the self-tuning runs' budget of epochs: each trial trains
the plain network (general weights only) for `task.trial_epochs` epochs at fixed
hyperparameters."""

import numpy as np
import optuna

from .. import _common, _search
from ._loop import Task, plain_training


def search(task: Task, method: str, seed: int, run: _common.Run) -> dict:
    """`task.epochs // task.trial_epochs` trials of `method` (`"random"` or `"tpe"`), each
    checkpointed (a resumed run replays the finished trials to the sampler, see
    `experiments._search`).

    **Returns:**

    The best trial's `val_loss`, `test_loss` and `hparams`, and every trial.
    """
    trials = max(1, task.epochs // task.trial_epochs)
    distributions = {
        f"h{i}": optuna.distributions.FloatDistribution(lo, hi, log=log)
        for i, (lo, hi, log) in enumerate(task.search)
    }
    # optuna's default of 10 random start-up trials would leave TPE nothing to model at small
    # budgets: a third of the trials, at least 2.
    startup = min(10, max(2, trials // 3))
    sampler = _search.sampler(method, seed + (10_000 if method == "tpe" else 0), startup)

    def objective(k, params):
        lam = [
            float(np.floor(v)) if spec.integer else v
            for spec, v in zip(task.specs, params.values())
        ]
        val, test, curve = plain_training(task, lam, seed * 1000 + k, task.trial_epochs)
        told = val if np.isfinite(val) else float("inf")
        return told, dict(hparams=lam, val_loss=val, test_loss=test, curve=curve)

    description = f"{task.name} {method} s{seed}"
    done = _search.search(
        run, f"{method}_{seed}", trials, sampler, distributions, objective, description=description
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
        best_so_far=np.minimum.accumulate(vals),
    )
