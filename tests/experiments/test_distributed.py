"""Several processes (`jax.distributed`, loopback) compute what one process computes.

`experiments.meta_ho` runs 3 meta-steps of Adam on a shared per-feature L2 strength over
meta-batches of 4 ridge tasks: once in this process (one device), and once as two processes on
127.0.0.1 (one CPU device each, gloo collectives, a free port), each sampling and holding only
its 2 tasks of every meta-batch (`_distributed_meta_ho.py`, beside this file, records what each
process ends with). The meta-gradients, losses, λ and Adam's state must agree to float64
rounding, be identical on both processes, and only process 0 may write files and progress. A
resumed run continues the same trajectory; the launcher kills every process when one fails or
time runs out; and two meta-steps of `experiments.hyper_representation` on two processes, each
holding half the episodes, match one process.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import _cli, _distributed, meta_ho


# Several processes: slow. `test_shard_map_implicit.py` runs a meta-step in one process by
# default.
pytestmark = pytest.mark.slow


ARGS = ["--steps", "3", "--meta-batch", "4", "--test-tasks", "8", "--seed", "3"]
NUM_PROCESSES = 2
RTOL = 1e-12  # the order of the cross-process sum differs from the one-device sum
TIMEOUT = 240


def relerr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    return meta_ho.main(["--out", str(out), *ARGS])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    state_dir = out / "states"
    state_dir.mkdir()
    script = Path(__file__).with_name("_distributed_meta_ho.py")
    command = [sys.executable, str(script), str(state_dir), "--distributed", "--out", str(out)]
    outputs = _distributed.launch_local(
        [*command, *ARGS], NUM_PROCESSES, timeout=TIMEOUT, env=_subprocess_env()
    )
    for i, (rc, stdout, stderr) in enumerate(outputs):
        assert rc == 0, f"process {i} failed (rc {rc}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    states = [json.loads((state_dir / f"state_{i}.json").read_text()) for i in range(2)]
    return out, states, outputs


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def test_two_processes_form_one_mesh(two_processes):
    _, states, _ = two_processes
    for i, state in enumerate(states):
        assert state["process_index"] == i
        assert state["process_count"] == NUM_PROCESSES
        assert state["device_count"] == NUM_PROCESSES
        assert state["local_device_count"] == 1


def test_same_meta_gradients_and_adam_state_as_one_process(one_process, two_processes):
    _, states, _ = two_processes
    single = one_process["history"]
    assert len(single["meta_grad"]) == 3
    for state in states:
        for step, (g2, g1) in enumerate(zip(state["meta_grad"], single["meta_grad"])):
            assert relerr(g2, g1) <= RTOL, (step, g2, g1)
        np.testing.assert_allclose(state["val_loss"], single["val_loss"], rtol=RTOL, atol=0)
        assert relerr(state["lam"], one_process["log_lam"]) <= RTOL
        leaves = [np.asarray(x) for x in jax.tree.leaves(one_process["opt_state"])]
        assert len(state["opt_state"]) == len(leaves) == 3  # Adam: count, mu, nu
        for got, want in zip(state["opt_state"], leaves):
            if want.dtype.kind == "i":
                assert np.array_equal(got, want)  # the step count
            else:
                assert relerr(got, want) <= RTOL
    # λ moved: the comparison is not between two untouched initial states.
    assert np.linalg.norm(one_process["log_lam"]) > 0.5


def test_processes_hold_identical_outer_state(two_processes):
    _, (first, second), _ = two_processes
    # Replicated: both processes take the very same step on the very same reduced gradient.
    for key in ("lam", "opt_state", "meta_grad", "val_loss"):
        assert first[key] == second[key], key


def test_meta_gradients_match_closed_form(one_process, two_processes):
    _, states, _ = two_processes
    assert max(one_process["history"]["relerr"]) < 1e-8
    for state in states:
        assert max(state["relerr"]) < 1e-8


def test_only_process_zero_writes(two_processes):
    # Checkpoints aside: each process writes its shards of them (see `test_checkpoint.py`).
    out, _, outputs = two_processes
    assert (out / "results.json").is_file()
    assert (out / "meta_ho.png").is_file()
    assert [p.name for p in (out / "checkpoints" / "meta_ho").iterdir()] == ["3"]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["num_processes"] == NUM_PROCESSES
    (_, _, stderr0), (_, _, stderr1) = outputs
    assert "meta-steps" in stderr0 and "Wrote" in stderr0
    assert "meta-steps" not in stderr1 and "Wrote" not in stderr1


def test_parser_and_argument_checks():
    plain = _cli.parser("x", "x").parse_args([])
    assert not hasattr(plain, "distributed")
    args = _cli.parser("x", "x", distributed=True).parse_args(
        ["--distributed", "--coordinator-address", "h:1", "--num-processes", "4"]
    )
    assert args.distributed and args.coordinator_address == "h:1" and args.num_processes == 4
    with pytest.raises(ValueError, match="num_processes"):
        _distributed.initialize("127.0.0.1:1", num_processes=0, process_id=0)
    with pytest.raises(ValueError, match="process_id"):
        _distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)


def test_resume_continues_the_same_trajectory(one_process, tmp_path):
    """A run stopped after 2 meta-steps and resumed to 3 (the checkpoint put back on the mesh,
    replicated) ends where the uninterrupted 3-step run ends."""
    first = ["--out", str(tmp_path), *ARGS]
    first[first.index("--steps") + 1] = "2"
    meta_ho.main(first)
    resumed = meta_ho.main(["--out", str(tmp_path), *ARGS, "--resume"])
    assert len(resumed["history"]["meta_grad"]) == 3
    np.testing.assert_array_equal(resumed["log_lam"], one_process["log_lam"])
    for got, want in zip(
        jax.tree.leaves(resumed["opt_state"]), jax.tree.leaves(one_process["opt_state"])
    ):
        np.testing.assert_array_equal(got, want)


def test_two_processes_resume_the_same_trajectory(two_processes, tmp_path):
    """Two processes stopped after 2 meta-steps and resumed to 3 (each loading the
    checkpoint, which both wrote, and putting it back on the mesh) end where the uninterrupted
    pair ends, bit for bit, having taken only the third step."""
    _, whole, _ = two_processes
    script = Path(__file__).with_name("_distributed_meta_ho.py")
    command = [sys.executable, str(script), str(tmp_path), "--distributed", "--out", str(tmp_path)]
    for steps, resume in (("2", []), ("3", ["--resume"])):
        args = [*ARGS, *resume]
        args[args.index("--steps") + 1] = steps
        outputs = _distributed.launch_local(
            [*command, *args], NUM_PROCESSES, timeout=TIMEOUT, env=_subprocess_env()
        )
        for i, (rc, stdout, stderr) in enumerate(outputs):
            assert rc == 0, f"process {i} failed (rc {rc}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["run"]["progress"]["meta_ho"] == {"from": 2, "to": 3}
    for i in range(NUM_PROCESSES):
        resumed = json.loads((tmp_path / f"state_{i}.json").read_text())
        for key in ("lam", "opt_state", "meta_grad", "val_loss"):
            assert resumed[key] == whole[i][key], (i, key)


SLEEP_UNLESS_FAILING = (
    "import os, sys, time\n"
    "if os.environ['JAX_PROCESS_ID'] == os.environ.get('FAIL', ''): sys.exit(3)\n"
    "time.sleep(60)\n"
)


def test_launcher_kills_the_others_when_one_fails():
    start = time.monotonic()
    outputs = _distributed.launch_local(
        [sys.executable, "-c", SLEEP_UNLESS_FAILING], 2, timeout=30, env={**os.environ, "FAIL": "1"}
    )
    assert time.monotonic() - start < 20  # not the 60 s sleep, nor the timeout
    (rc0, _, _), (rc1, _, _) = outputs
    assert rc1 == 3
    assert rc0 is not None and rc0 < 0  # killed by a signal


def test_launcher_timeout_kills_every_process(tmp_path):
    pids = tmp_path / "pids"
    script = (
        "import os, time\n"
        f"open({str(pids)!r} + os.environ['JAX_PROCESS_ID'], 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        _distributed.launch_local([sys.executable, "-c", script], 2, timeout=3)
    for i in range(2):
        pid = int((tmp_path / f"pids{i}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone (killed and reaped)


def test_hyper_representation_meta_steps_on_two_processes(tmp_path):
    """Two meta-steps of `experiments.hyper_representation` (tiny conv net, float64, 8 episodes)
    as two processes, each building only its 4 episodes, end in the state one process reaches
    with the whole meta-batch. About 2 minutes on 2 cores: most of it compiling the conv net."""
    import _distributed_hyper_rep as driver  # this folder is on sys.path (pytest prepends it)

    script = Path(__file__).with_name("_distributed_hyper_rep.py")
    outputs = _distributed.launch_local(
        [sys.executable, str(script), str(tmp_path)], 2, timeout=600, env=_subprocess_env()
    )
    for i, (rc, stdout, stderr) in enumerate(outputs):
        assert rc == 0, f"process {i} failed (rc {rc}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    one = driver.two_meta_steps()
    states = [json.loads((tmp_path / f"state_{i}.json").read_text()) for i in range(2)]
    assert [s["local"] for s in states] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert states[0]["leaves"] == states[1]["leaves"]  # replicated: the very same state
    assert len(states[0]["leaves"]) == len(one["leaves"]) > 5
    for got, want in zip(states[0]["leaves"], one["leaves"]):
        assert relerr(got, want) <= 1e-12
    np.testing.assert_allclose(states[0]["loss"], one["loss"], rtol=1e-12)
    assert one["loss"][1] < one["loss"][0]  # the steps did something
