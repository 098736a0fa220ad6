"""Checkpoints (`experiments/_checkpoint.py`): orbax checkpoints of data only (round trip, no
pickle opened, refusal of corrupt and mismatched ones naming the file, a version-1 `.npz` read),
saves that a kill at any instant cannot lose, and a run killed with SIGKILL during a save that
resumes from its last complete one and ends where an uninterrupted run ends, in one process and
in two (`jax.distributed` on CPU, each process writing its own shards)."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import _checkpointed_run  # this folder is on sys.path (pytest prepends it)
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from experiments import _checkpoint, _distributed, _optax


DRIVER = Path(__file__).with_name("_checkpointed_run.py")


def _state():
    model = eqx.nn.MLP(2, 1, 3, 1, key=jax.random.key(0))
    opt_state = optax.inject_hyperparams(optax.adam)(learning_rate=0.1).init(jnp.zeros(3))
    return dict(
        model=model,
        opt_state=opt_state,
        pair=(1, "two"),
        history=dict(loss=[1.5, float("nan"), float("inf")], flags=[True, None], empty=[]),
        arrays=[np.arange(3, dtype=np.int32), jnp.ones((2, 2), jnp.bfloat16), np.float32(2.5)],
        steps=[np.float64(k / 3) for k in range(50)],
        key=jax.random.key(3),
        big=2**100,
    )


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if isinstance(x, float) and np.isnan(x):
            assert np.isnan(y)
        elif hasattr(x, "dtype") or hasattr(y, "dtype"):
            assert np.asarray(x).dtype == np.asarray(y).dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y and type(x) is type(y)


def _no_pickles(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint used pickle")

    for name in ("load", "loads", "dump", "dumps", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, refuse)


def test_round_trip_without_pickles(tmp_path, monkeypatch):
    _no_pickles(monkeypatch)
    state = _state()
    _checkpoint.save_tree(tmp_path / "s", state, run_id="r")
    _assert_same(_checkpoint.load_tree(tmp_path / "s", like=_state()), state)
    # Data only: the structure is JSON in orbax's step metadata, the arrays are packed by
    # dtype (the 50 history entries are one array).
    metadata = json.loads((tmp_path / "s" / "_CHECKPOINT_METADATA").read_text())
    structure = metadata["custom_metadata"]
    assert structure["format"] == "bilevax-experiments-checkpoint" and structure["run_id"] == "r"
    assert sorted(structure["arrays"]) == ["bfloat16", "float32", "float64", "int32", "uint32"]


def test_checkpoint_feeds_back_into_jit(tmp_path):
    optimizer = optax.adam(0.1)
    params = jnp.linspace(0.0, 1.0, 4)
    state = optimizer.init(params)
    step = jax.jit(lambda p, s: _optax.optax_step(optimizer, p, s, p))
    for _ in range(3):
        params, state = step(params, state)
    _checkpoint.save_tree(tmp_path / "s", dict(params=params, state=state))
    loaded = _checkpoint.load_tree(tmp_path / "s", like=dict(params=params, state=state))
    np.testing.assert_array_equal(step(params, state)[0], step(*loaded.values())[0])


def test_mismatched_structure_or_dtype_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "s"
    _checkpoint.save_tree(path, _state())
    with pytest.raises(_checkpoint.CheckpointError, match=f"{path}: model .*nothing to match"):
        _checkpoint.load_tree(path)
    # An array of another shape or dtype than this run's (a run with other options) ...
    other = dict(_state(), opt_state=optax.inject_hyperparams(optax.adam)(0.1).init(jnp.zeros(5)))
    with pytest.raises(
        _checkpoint.CheckpointError,
        match=rf"{path}: opt_state<7> is float64\[3\] where this run has float64\[5\]",
    ):
        _checkpoint.load_tree(path, like=other)
    to_float32 = lambda x: x.astype(np.float32) if eqx.is_array(x) else x
    single = dict(_state(), model=jax.tree.map(to_float32, _state()["model"]))
    with pytest.raises(
        _checkpoint.CheckpointError, match=rf"{path}: model<0> is float64\[3, 2\] where this run"
    ):
        _checkpoint.load_tree(path, like=single)
    # ... and another kind of node, or one with other leaves.
    with pytest.raises(_checkpoint.CheckpointError, match=f"{path}: opt_state holds a "):
        _checkpoint.load_tree(path, like=dict(_state(), opt_state=optax.adam(0.1).init(1.0)))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "metadata"])
def test_corrupt_checkpoint_names_the_file(tmp_path, damage):
    checkpoints = _checkpoint.Checkpoints(tmp_path)
    checkpoints.save("loop", dict(step=3, x=np.arange(1000.0)))
    path = checkpoints.path("loop") / "1"
    for file in path.rglob("*"):
        if not file.is_file():
            continue
        data = file.read_bytes()
        if damage == "truncate" and file.parent.name == "d":  # the arrays' data
            file.write_bytes(data[: len(data) // 2])
        elif damage == "garbage" and file.name == "_METADATA":  # the arrays' metadata
            file.write_bytes(b"x" * 100)
        elif damage == "empty":
            file.write_bytes(b"")
        elif damage == "metadata" and file.name == "_CHECKPOINT_METADATA":  # the structure
            file.write_bytes(b"{")
    with pytest.raises(_checkpoint.CheckpointError, match=str(path)):
        checkpoints.load("loop")


def _version_1(path: Path, structure: dict, **arrays) -> None:
    text = json.dumps(dict(format="bilevax-experiments-checkpoint", version=1, **structure))
    np.savez(path, __structure__=np.frombuffer(text.encode(), np.uint8), **arrays)


def test_version_1_npz_is_read_and_replaced(tmp_path):
    checkpoints = _checkpoint.Checkpoints(tmp_path, "r")
    checkpoints.directory.mkdir()
    npz = checkpoints.directory / "loop.npz"
    tree = {"$dict": {"step": 2, "w": {"$array": "a0", "dtype": "bfloat16"}, "x": {"$array": "a1"}}}
    w = jnp.asarray([1.5, -2.0], jnp.bfloat16)
    _version_1(npz, dict(tree=tree, run_id="r"), a0=np.asarray(w).view(np.uint16), a1=np.eye(2))
    state = checkpoints.load("loop")
    assert state["step"] == 2 and state["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(state["w"], w)
    np.testing.assert_array_equal(state["x"], np.eye(2))
    checkpoints.save("loop", dict(state, step=3))
    assert not npz.exists() and checkpoints.load("loop")["step"] == 3


def test_pickles_and_object_arrays_are_refused(tmp_path):
    checkpoints = _checkpoint.Checkpoints(tmp_path)
    checkpoints.directory.mkdir()
    (checkpoints.directory / "loop.pkl").write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)
    with pytest.raises(_checkpoint.CheckpointError, match="loop.pkl.*not opened"):
        checkpoints.load("loop")
    # A version-1 .npz with an object array (which only a pickle can hold) is refused too.
    npz = checkpoints.directory / "other.npz"
    _version_1(npz, dict(tree={"$array": "a0"}), a0=np.array([{"x": 1}], dtype=object))
    with pytest.raises(_checkpoint.CheckpointError, match=str(npz)):
        checkpoints.load("other")
    for unsupported in (np.array([None]), np.array(["text"])):  # Python strings are fine
        with pytest.raises(TypeError, match=r"^\.a: an array of .* cannot be checkpointed"):
            checkpoints.save("x", dict(a=unsupported))


def test_a_save_killed_before_its_rename_leaves_the_last_one(tmp_path, monkeypatch):
    checkpoints = _checkpoint.Checkpoints(tmp_path)
    checkpoints.save("loop", dict(step=1))

    def die(self, directory):
        raise KeyboardInterrupt  # written, not yet renamed into place

    with monkeypatch.context() as patch:
        patch.setattr(ocp.PyTreeCheckpointHandler, "finalize", die)
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save("loop", dict(step=2))
    folder = checkpoints.path("loop")
    assert len(list(folder.iterdir())) == 2  # the last save, and the killed one's leftovers
    assert checkpoints.load("loop") == dict(step=1)
    # Killed after the rename, before the older one was deleted: the newer one is loaded.
    _checkpoint.save_tree(folder / "2", dict(step=2))
    assert checkpoints.load("loop") == dict(step=2)
    checkpoints.save("loop", dict(step=3))
    assert [p.name for p in folder.iterdir()] == ["3"]  # the rest cleared away
    assert checkpoints.load("loop") == dict(step=3)


def test_resume_after_sigkill_during_a_save(tmp_path):
    """Killed with SIGKILL while writing its 3rd checkpoint (after step 3 of 5), the run
    resumes from the 2nd: it executes steps 2, 3 and 4 (not all 5, as a run that silently
    restarted would) and ends where the uninterrupted run ends, bit for bit."""
    whole = _checkpointed_run.run(["--out", str(tmp_path / "whole"), "--steps", "5"])
    assert whole["executed"] == [0, 1, 2, 3, 4]
    out = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, str(DRIVER), str(out), "5", "--kill-at-save", "3"],
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "final_0.json").exists()
    resumed = _checkpointed_run.run(["--out", str(out), "--steps", "5", "--resume"])
    assert resumed["executed"] == [2, 3, 4]
    assert resumed["progress"] == {"from": 2, "to": 5}
    for key in ("x", "key", "history"):
        assert resumed[key] == whole[key], key


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_two_processes_save_their_shards_and_resume_after_sigkill(tmp_path):
    """Two processes (one CPU device each) run 5 steps on an array split between them, each
    writing its half; killed with SIGKILL during the 3rd save (process 0 dies, the launcher
    kills process 1), they resume from the 2nd, execute steps 2 to 4 and end where the
    uninterrupted pair ends, bit for bit, on both processes."""

    def launch(out, *options):
        command = [sys.executable, str(DRIVER), str(out), "5", "--distributed", *options]
        return _distributed.launch_local(command, 2, timeout=240, env=_subprocess_env())

    def finals(out):
        return [json.loads((out / f"final_{i}.json").read_text()) for i in range(2)]

    for i, (rc, stdout, stderr) in enumerate(launch(tmp_path / "whole")):
        assert rc == 0, f"process {i} failed (rc {rc}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    whole = finals(tmp_path / "whole")
    (last,) = (tmp_path / "whole" / "checkpoints" / "loop").iterdir()
    assert any((last / "ocdbt.process_1" / "d").iterdir())  # process 1 wrote its shard
    out = tmp_path / "killed"
    (rc0, _, stderr0), _ = launch(out, "--kill-at-save", "3")
    assert rc0 == -signal.SIGKILL, stderr0[-3000:]
    for i, (rc, stdout, stderr) in enumerate(launch(out, "--resume")):
        assert rc == 0, f"process {i} failed (rc {rc}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    for whole_i, resumed in zip(whole, finals(out)):
        assert whole_i["executed"] == [0, 1, 2, 3, 4]
        assert resumed["executed"] == [2, 3, 4]
        assert resumed["progress"] == {"from": 2, "to": 5}
        for key in ("x", "key", "history"):
            assert resumed[key] == whole_i[key], key
    assert finals(out)[0]["x"] == finals(out)[1]["x"]
