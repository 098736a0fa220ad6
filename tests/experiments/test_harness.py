"""The run harness (`experiments/_harness.py`, `_cli.py`; checkpoints themselves are
`test_checkpoint.py`'s): atomic writes, a checkpoint copied from another run refused, the
output directory rules (refused without `--resume` or `--overwrite`, a new directory by
default), the configuration check on `--resume` (every experiment refuses a mismatch), resumable
loops that count the steps they run, results that describe themselves, and the data directory."""

import hashlib
import importlib
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import _atomic, _checkpoint, _cli, _harness, _optax, _optuna, _outputs
from experiments.data import data_dir


# -- atomic writes -------------------------------------------------------------------------------


def test_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "file.json"
    _atomic.atomic_write(path, b"old")

    def fail(*args):
        raise KeyboardInterrupt  # killed between writing and renaming

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        _atomic.atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


# -- the output directory and the configuration -------------------------------------------------


def _args(out, *argv):
    p = _cli.parser("toy", "a toy experiment")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.5)
    args = p.parse_args([*(["--out", str(out)] if out else []), *argv])
    return args


def _toy(out, *argv, fail_at=None, **kwargs):
    """A toy experiment: `--steps` steps of x ← x + lr, checkpointed each step. Returns the
    run, the final x and the steps it executed."""
    args = _args(out, *argv)
    run = _harness.start(args, **kwargs)
    executed = []

    def step(k, state):
        if k == fail_at:
            raise KeyboardInterrupt
        executed.append(k)
        state["x"] = state["x"] + args.lr
        return state, f"x {float(state['x']):.2f}"

    state = run.loop("x", args.steps, lambda: dict(x=jnp.zeros(())), step)
    run.write_results(dict(x=state["x"]))
    return run, float(state["x"]), executed


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path):
    _toy(tmp_path)
    with pytest.raises(_harness.RunError, match="already holds a run.*--resume.*--overwrite"):
        _toy(tmp_path)
    # A directory that holds something else is not a run: it is used.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _toy(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_old_run(tmp_path):
    _toy(tmp_path, "--steps", "5")
    extra = tmp_path / "checkpoints" / "stale.npz"
    extra.write_bytes(b"")
    run, x, executed = _toy(tmp_path, "--steps", "2", "--overwrite")
    assert executed == [0, 1] and x == 1.0
    assert not extra.exists()
    assert json.loads((tmp_path / "run.json").read_text())["config"]["steps"] == 2


def test_resume_refuses_other_options_naming_each(tmp_path):
    _toy(tmp_path)
    with pytest.raises(_harness.RunError) as error:
        _toy(tmp_path, "--resume", "--lr", "0.1", "--seed", "1")
    message = str(error.value)
    assert "--lr: 0.5 in the saved run, 0.1 now" in message
    assert "--seed: 0 in the saved run, 1 now" in message
    assert "--steps" not in message


def test_resume_allow_list(tmp_path):
    _, x, executed = _toy(tmp_path, "--steps", "2", may_grow=("steps",))
    assert executed == [0, 1]
    # More steps continue the run: only the new ones are executed ...
    run, x, executed = _toy(tmp_path, "--steps", "4", "--resume", may_grow=("steps",))
    assert executed == [2, 3] and x == 2.0
    assert run.progress["x"] == {"from": 2, "to": 4}
    # ... and the run is now a 4-step one: fewer steps are refused.
    with pytest.raises(_harness.RunError, match="--steps: 4 in the saved run, 2 now"):
        _toy(tmp_path, "--steps", "2", "--resume", may_grow=("steps",))
    # Options in `may_change` may change either way; others may not.
    with pytest.raises(_harness.RunError, match="--lr: 0.5 in the saved run, 1.0 now"):
        _toy(tmp_path, "--steps", "4", "--lr", "1.0", "--resume", may_grow=("steps",))
    run, x, executed = _toy(tmp_path, "--steps", "4", "--lr", "1.0", "--resume", may_change=("lr",))
    assert executed == [] and x == 2.0


def test_resume_counts_the_steps_it_executes(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _toy(tmp_path, "--steps", "5", fail_at=3)  # killed during step 3
    run, x, executed = _toy(tmp_path, "--steps", "5", "--resume")
    assert executed == [3, 4] and x == 2.5 and run.resumed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["run"]["progress"]["x"] == {"from": 3, "to": 5}
    # A finished run re-runs nothing.
    run, x, executed = _toy(tmp_path, "--steps", "5", "--resume")
    assert executed == [] and x == 2.5


def test_resume_of_nothing_starts_afresh(tmp_path):
    run, x, executed = _toy(tmp_path / "new", "--resume")
    assert executed == [0, 1, 2] and not run.resumed


def test_default_out_is_new_and_resume_finds_the_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, _, _ = _toy(None)
    second, _, _ = _toy(None)
    assert first.out != second.out
    assert first.out.parent == second.out.parent == pathlib.Path("runs")
    assert first.out.name.startswith("toy-")
    resumed, _, executed = _toy(None, "--resume")
    assert resumed.out == max(first.out, second.out) and executed == []


def test_results_describe_themselves(tmp_path):
    _toy(tmp_path, "--lr", "0.25")
    path = tmp_path / "results.json"
    assert stat.S_IMODE(path.stat().st_mode) == _atomic.FILE_MODE
    saved = [p for p in (tmp_path / "checkpoints" / "x").rglob("*") if p.is_file()]
    assert saved and {stat.S_IMODE(p.stat().st_mode) for p in saved} == {_atomic.FILE_MODE}
    run = json.loads(path.read_text())["run"]
    assert run["experiment"] == "toy"
    assert run["config"] == {"quick": False, "seed": 0, "steps": 3, "lr": 0.25}
    assert run["environment"]["versions"]["jax"] == jax.__version__
    assert run["environment"]["devices"]["platform"] == jax.devices()[0].platform
    assert run["progress"] == {"x": {"from": 0, "to": 3}}


def test_stage_is_computed_once(tmp_path):
    calls = []
    run = _harness.start(_args(tmp_path))
    compute = lambda: calls.append(1) or dict(value=np.arange(3))
    assert run.stage("s", compute)["value"].tolist() == [0, 1, 2]
    run = _harness.start(_args(tmp_path, "--resume"))
    assert run.stage("s", compute)["value"].tolist() == [0, 1, 2]
    assert len(calls) == 1 and run.progress["s"] == {"from": 1, "to": 1}


def test_search_resumes_with_the_trials_it_would_have_drawn(tmp_path):
    FloatDistribution = _optuna.optuna.distributions.FloatDistribution
    distributions = {f"x{i}": FloatDistribution(-1.0, 1.0) for i in range(2)}
    calls = []

    def search(out, *argv, fail_at=None):
        def objective(k, params):
            if k == fail_at:
                raise KeyboardInterrupt
            calls.append(k)
            return sum(v**2 for v in params.values()), {}

        run = _harness.start(_args(out, *argv))
        sampler = _optuna.sampler("tpe", 0, startup=2)
        return _optuna.search(run, "tpe", 6, sampler, distributions, objective)["trials"]

    whole = search(tmp_path / "whole")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "cut", fail_at=4)
    assert calls == [0, 1, 2, 3]
    calls.clear()
    resumed = search(tmp_path / "cut", "--resume")
    assert calls == [4, 5]  # the finished trials are replayed to the sampler, not re-run
    # TPE models the trials it has seen: the same trials mean it was replayed faithfully.
    assert [t["params"] for t in resumed] == [t["params"] for t in whole]


def test_search_on_a_budget_of_seconds_stops_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    # A fake clock that only the objective advances, one second per trial: the count of trials
    # is then exact, not a matter of the machine's speed.
    clock = [0.0]
    monkeypatch.setattr(_optuna.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(_harness.time, "perf_counter", lambda: clock[0])
    distributions = {"x": _optuna.optuna.distributions.FloatDistribution(-1.0, 1.0)}
    calls = []

    def search(*argv, budget):
        def objective(k, params):
            calls.append(k)
            clock[0] += 1.0
            return params["x"] ** 2, {}

        run = _harness.start(_args(tmp_path, *argv))
        sampler = _optuna.sampler("random", 0)
        return _optuna.search(
            run, "rs", 1000, sampler, distributions, objective, budget_seconds=budget
        )

    state = search(budget=2.5)  # trials start at 0, 1 and 2 s: three fit
    assert calls == [0, 1, 2] and state["seconds"] == 3.0
    assert [t["elapsed"] for t in state["trials"]] == [1.0, 2.0, 3.0]
    calls.clear()
    assert len(search("--resume", budget=2.5)["trials"]) == 3 and calls == []
    state = search("--resume", budget=4.5)  # a larger budget continues the same search
    assert calls == [3, 4] and [t["elapsed"] for t in state["trials"]][-2:] == [4.0, 5.0]


def test_optax_step_under_strict_promotion():
    # The test suite runs with strict dtype promotion, under which optax's Adam alone fails.
    optimizer = optax.adam(0.1)
    params = jnp.ones(3)
    new, _ = _optax.optax_step(optimizer, params, optimizer.init(params), params)
    np.testing.assert_allclose(new, 0.9)
    box = lambda p: jnp.clip(p, 0.95, 2.0)
    new, _ = _optax.optax_step(optimizer, params, optimizer.init(params), params, project=box)
    np.testing.assert_allclose(new, 0.95)


# -- the data directory ------------------------------------------------------------------------


def test_data_dir_takes_the_first_that_is_set(tmp_path, monkeypatch):
    from experiments.data import _files

    for name in ("given", "env", "default"):
        (tmp_path / name / "mnist").mkdir(parents=True)
    monkeypatch.setattr(_files, "DEFAULT_DATA", tmp_path / "default")
    monkeypatch.setenv("BILEVAX_DATA", str(tmp_path / "env"))
    args = _args(tmp_path, "--data-dir", str(tmp_path / "given"))
    assert data_dir(args, "mnist") == tmp_path / "given"
    # The first that is set is the only place looked at: no fallback to the others.
    with pytest.raises(FileNotFoundError, match=r"given/omniglot.*--data-dir"):
        data_dir(args, "omniglot")
    args.data_dir = None
    assert data_dir(args, "mnist") == tmp_path / "env"
    (tmp_path / "env" / "mnist").rmdir()
    with pytest.raises(FileNotFoundError, match=r"env/mnist.*BILEVAX_DATA"):
        data_dir(args, "mnist")
    monkeypatch.delenv("BILEVAX_DATA")
    assert data_dir(args, "mnist") == tmp_path / "default"


# -- every experiment and benchmark ------------------------------------------------------------


EXPERIMENTS = [
    "ridge_l2",
    "hyper_cleaning",
    "unroll_length",
    "lasso_ho",
    "stochastic_bilevel",
    "meta_ho",
    "delta_stn.__main__",
    "delta_stn.stability",
    "delta_stn.time_budget",
    "delta_stn.fair_budget",
    "hyper_representation._run",
    "hypergrad_diagnostics",
]
BENCHMARKS = [
    "accuracy",
    "implicit_vs_jaxopt",
    "unrolled_memory",
    "forward_vs_reverse",
    "task_batching",
    "hyper_representation_step",
    "delta_stn_step",
    "weak_scaling",
]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_refuses_an_existing_run_and_other_options(tmp_path, name):
    main = importlib.import_module(f"experiments.{name}").main
    (tmp_path / "run.json").write_text(json.dumps({"config": {"seed": 7}}))
    with pytest.raises(_harness.RunError, match="already holds a run"):
        main(["--out", str(tmp_path)])
    with pytest.raises(_harness.RunError, match="--seed: 7 in the saved run, 0 now"):
        main(["--out", str(tmp_path), "--resume"])


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_refuses_to_replace_its_outputs(tmp_path, name):
    main = importlib.import_module(f"experiments.benchmarks.{name}").main
    (tmp_path / f"{name}.json").write_text("{}")
    with pytest.raises(_harness.RunError, match=f"{name}.json.*--overwrite"):
        main(["--quick", "--out", str(tmp_path)])


def test_write_json_converts_arrays(tmp_path):
    path = _outputs.write_json(
        tmp_path / "r.json", {"a": jnp.asarray(1.5), "b": np.float32(2.0), "c": np.arange(3)}
    )
    assert json.loads(path.read_text()) == {"a": 1.5, "b": 2.0, "c": [0, 1, 2]}


# -- one run per directory, on one data set, with its own checkpoints ---------------------------

# A process that claims a directory the moment the test says go, says whether it got it, and
# holds it until it is killed. It imports only `experiments._claim`: no JAX, so both start fast.
_CLAIMANT = """
import pathlib, sys, time
from experiments import _claim
out, go = sys.argv[1:]
while not pathlib.Path(go).exists():
    time.sleep(0.001)
try:
    _claim.claim(out)
except _claim.DirectoryHeld as error:
    print("refused", error, flush=True)
else:
    print("claimed", flush=True)
    sys.stdin.read()
"""


def test_two_runs_started_at_once_into_one_directory(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    root = pathlib.Path(__file__).resolve().parents[2]
    claimants = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMANT, str(out), str(go)],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        go.touch()
        said = sorted(c.stdout.readline() for c in claimants)
        assert said[0] == "claimed\n" and said[1].startswith(f"refused Another run holds {out}")
        # The live run's claim holds against every way of starting, and against a benchmark.
        for argv in [(), ("--resume",), ("--overwrite",)]:
            with pytest.raises(_harness.RunError, match="Another run holds .*process"):
                _toy(out, *argv)
        with pytest.raises(_harness.RunError, match="Another run holds"):
            _harness.claim_outputs(_args(out), ["toy.json"])
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    finally:
        for c in claimants:
            c.kill()  # a crash: the operating system releases the lock
            c.wait()
            c.stdout.close()
    run, x, executed = _toy(out, "--resume")  # nothing to resume, and no stale claim in the way
    assert executed == [0, 1, 2]


def _data(directory: pathlib.Path, content: bytes) -> str:
    """A data directory holding `toy/a.bin` with `content`, listed in its `SHA256SUMS`."""
    (directory / "toy").mkdir(parents=True)
    (directory / "toy" / "a.bin").write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    (directory / "SHA256SUMS").write_text(f"{digest}  toy/a.bin\n")
    return digest


def test_resume_on_other_data_is_refused_naming_the_file(tmp_path, monkeypatch):
    from experiments.data import find

    monkeypatch.setenv("BILEVAX_CACHE", str(tmp_path / "cache"))
    old, new = _data(tmp_path / "old", b"old"), _data(tmp_path / "new", b"new")
    _data(tmp_path / "copy", b"old")

    def run_on(data, *argv):
        args = _args(tmp_path / "run", "--data-dir", str(tmp_path / data), *argv)
        run = _harness.start(args)
        find("toy/a.bin", data_dir(args), download="nowhere")  # what a loader does
        run.write_results({})
        return run

    run_on("old")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"] == {"toy/a.bin": old}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["run"]["data"] == {"toy/a.bin": old}
    assert run_on("copy", "--resume").data == {"toy/a.bin": old}  # the same data elsewhere
    with pytest.raises(_harness.RunError) as error:
        run_on("new", "--resume")
    message = str(error.value)
    assert "other data: the data file toy/a.bin" in message
    assert f"{new} now" in message and f"computed with SHA-256 {old}" in message


def test_checkpoint_copied_from_another_run_is_refused(tmp_path):
    _toy(tmp_path / "seed0")
    with pytest.raises(KeyboardInterrupt):
        _toy(tmp_path / "seed1", "--seed", "1", fail_at=2)
    ids = [
        json.loads((tmp_path / s / "run.json").read_text())["run_id"] for s in ("seed0", "seed1")
    ]
    assert ids[0] != ids[1]
    copied = tmp_path / "seed1" / "checkpoints" / "x"
    shutil.rmtree(copied)
    shutil.copytree(tmp_path / "seed0" / "checkpoints" / "x", copied)
    with pytest.raises(_checkpoint.CheckpointError, match=f"{copied}/3 belongs to another run"):
        _toy(tmp_path / "seed1", "--seed", "1", "--resume")
    # A run from before run ids (none in run.json, nor in its checkpoints) still resumes, and
    # goes on accepting its old checkpoints once it has an id ...
    legacy = tmp_path / "legacy"
    _checkpoint.save_tree(legacy / "checkpoints" / "s" / "1", dict(value=1))
    config = {"quick": False, "seed": 0, "steps": 3, "lr": 0.5}
    (legacy / "run.json").write_text(json.dumps({"config": config}))
    for _ in range(2):
        run = _harness.start(_args(legacy, "--resume"))
        assert run.stage("s", lambda: dict(value=2)) == dict(value=1)
    assert run.run_id == json.loads((legacy / "run.json").read_text())["run_id"]
    # ... while a run that had its id from the start refuses a checkpoint without one.
    copied = tmp_path / "seed0" / "checkpoints" / "s"
    shutil.copytree(legacy / "checkpoints" / "s", copied)
    run = _harness.start(_args(tmp_path / "seed0", "--resume"))
    with pytest.raises(
        _checkpoint.CheckpointError, match=f"{copied}/1 belongs to another run: it ca"
    ):
        run.stage("s", lambda: dict(value=2))
