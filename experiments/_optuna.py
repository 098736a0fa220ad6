"""Random search and TPE (optuna) as a resumable loop, one trial per step.

A resumed search re-asks the sampler for the trials its checkpoint holds and re-tells their
values without re-running them, so that the sampler (seeded) is where an uninterrupted search
would be, and the trials that follow are the ones it would have drawn.
"""

import time
from collections.abc import Callable, Mapping

import optuna

from . import _checkpoint, _harness


def sampler(method: str, seed: int, startup: int | None = None) -> optuna.samplers.BaseSampler:
    """`RandomSampler` for `"random"`, `TPESampler` for `"tpe"` (with `startup` random trials
    first where given, else optuna's default), seeded with `seed`."""
    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if method == "tpe":
        kwargs = {} if startup is None else dict(n_startup_trials=startup)
        return optuna.samplers.TPESampler(seed=seed, **kwargs)
    raise ValueError(f"`method` must be 'random' or 'tpe', got {method!r}.")


def search(
    run: _harness.Run,
    name: str,
    trials: int,
    sampler: optuna.samplers.BaseSampler,
    distributions: Mapping[str, optuna.distributions.BaseDistribution],
    objective: Callable[[int, dict], tuple[float, dict]],
    *,
    description: str | None = None,
    every: int = 1,
    budget_seconds: float | None = None,
) -> dict:
    """`trials` trials of `sampler` over `distributions`, minimising, checkpointed under `name`.

    **Arguments:**

    - `objective`: `(k, params) -> (value, record)`: the value told to the study for trial `k`
        at `params` (a dict keyed like `distributions`), and what to keep of the trial.
    - `budget_seconds`: stop early, before the first trial that would start after this many
        seconds of searching (summed over resumed invocations): as many trials as fit.

    **Returns:**

    The loop's final state (see `Run.loop`): `"trials"`, every trial in order (its `record`
    with `params`, `value` and `elapsed` added: the search's seconds at the trial's end), and
    `"seconds"`.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=sampler)

    def step(k, state):
        tic = time.perf_counter()
        done = state["trials"]
        for i in range(len(study.trials), k):  # a resumed search: replay the finished trials
            trial = study.ask(dict(distributions))
            if trial.params != done[i]["params"]:
                raise _checkpoint.CheckpointError(
                    f"{run.checkpoints.path(name)}: trial {i} was {done[i]['params']}, but the "
                    f"sampler now draws {trial.params}: not this search's checkpoint."
                )
            study.tell(trial, done[i]["value"])
        trial = study.ask(dict(distributions))
        value, record = objective(k, dict(trial.params))
        study.tell(trial, value)
        elapsed = state["seconds"] + time.perf_counter() - tic
        done.append(dict(record, params=trial.params, value=value, elapsed=elapsed))
        return state, f"best {study.best_value:.5f}"

    fresh = lambda: dict(trials=[])
    until = None if budget_seconds is None else lambda state: state["seconds"] >= budget_seconds
    return run.loop(name, trials, fresh, step, description=description, every=every, until=until)
