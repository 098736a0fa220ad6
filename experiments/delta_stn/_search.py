"""Random search and TPE (optuna) at the self-tuning runs' budget of epochs: each trial trains
the plain network (general weights only) for `task.trial_epochs` epochs at fixed
hyperparameters."""

import numpy as np
import optuna

from .. import _common
from ._loop import Task, plain_training


def _sampler(method: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if method == "tpe":
        # optuna's default of 10 random start-up trials would leave TPE nothing to model at
        # small budgets: a third of the trials, at least 2.
        startup = min(10, max(2, trials // 3))
        return optuna.samplers.TPESampler(seed=seed + 10_000, n_startup_trials=startup)
    raise ValueError(f"`method` must be 'random' or 'tpe', got {method!r}.")


def search(task: Task, method: str, seed: int, ckpt: _common.Checkpoints) -> dict:
    """`task.epochs // task.trial_epochs` trials of `method` (`"random"` or `"tpe"`), each
    checkpointed; a resumed run re-tells the finished trials to a fresh study.

    **Returns:**

    The best trial's `val_loss`, `test_loss` and `hparams`, and every trial.
    """
    name = f"{method}_{seed}"
    trials = max(1, task.epochs // task.trial_epochs)
    distributions = {
        f"h{i}": optuna.distributions.FloatDistribution(lo, hi, log=log)
        for i, (lo, hi, log) in enumerate(task.search)
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=_sampler(method, seed, trials))
    done = ckpt.load(name, [])
    for t in done:
        study.add_trial(
            optuna.trial.create_trial(
                params=t["params"], distributions=distributions, value=t["val_loss"]
            )
        )
    with _common.progress(f"{task.name} {method} s{seed}", trials, len(done)) as advance:
        for k in range(len(done), trials):
            trial = study.ask(distributions)
            params = {n: trial.params[n] for n in distributions}
            lam = [
                float(np.floor(v)) if spec.integer else v
                for spec, v in zip(task.specs, params.values())
            ]
            val, test, curve = plain_training(task, lam, seed * 1000 + k, task.trial_epochs)
            study.tell(trial, val if np.isfinite(val) else float("inf"))
            done.append(dict(params=params, hparams=lam, val_loss=val, test_loss=test, curve=curve))
            ckpt.save(name, done)
            advance(f"best {study.best_value:.4f}")
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
