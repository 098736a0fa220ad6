"""Checkpoints in orbax-checkpoint's format, data only: arrays in TensorStore files, the state's
structure as JSON in orbax's step metadata (`_CHECKPOINT_METADATA`), never pickles, so that
opening a run directory someone shared runs no code. Each carries the id of the run that wrote
it, and another run's is refused.

`checkpoints/<name>/<n>/` is the `n`-th save of `name`. orbax writes it under a temporary name
and renames it when complete, and the save before it is deleted only then, so a run killed at
any instant (`kill -9` included) leaves a complete checkpoint to resume from. With several
processes each writes the shards of the arrays it holds; none gathers the others'.

Why not orbax's own handling of pytrees: restored without a target, a state comes back with
its tuples as lists, NumPy scalars as Python numbers, Equinox modules and optax states as dicts
and lists, and integers beyond 64 bits are refused; a fresh state cannot be the target, since a
run's histories grow; and orbax costs a millisecond or more per array, where a history holds
thousands. So the structure is ours (`_encode`, as JSON), and the arrays go to orbax packed,
one flat array per dtype.
"""

import json
import math
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from ._distributed import is_main_process


CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints, in its output directory


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back: truncated, corrupt, not in the data-only format,
    not the state this run expects, or another run's. The message names the file."""


_FORMAT = "bilevax-experiments-checkpoint"
_VERSION = 2  # 1: a `.npz` with the structure inside, from before orbax (read, never written)
_SCALARS = (bool, int, float, str, type(None))
_STEP_METADATA = "_CHECKPOINT_METADATA"


def _orbax():
    # Imported when a checkpoint is first saved or read: it adds about a second to the start of
    # every experiment, benchmark and test otherwise.
    import orbax.checkpoint as ocp

    return ocp


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


class _Arrays:
    """A state's arrays as they go to orbax. An array that this process holds whole (NumPy, or
    JAX on this process's devices) is appended to the one flat array of its dtype; a global
    array spanning several processes (`--distributed`) goes as it is, so that every process
    writes its own shards (orbax writes each shard once, from the replica it picks)."""

    def __init__(self):
        self.flat: dict[str, list[np.ndarray]] = {}
        self.sizes: dict[str, int] = {}
        self.spanning: dict[str, jax.Array] = {}

    def add(self, x, where: str) -> dict:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            name = f"spanning{len(self.spanning)}"
            self.spanning[name] = x
            return {"$array": name}
        a = np.asarray(x)
        if a.dtype.kind in "OUS":  # TensorStore holds numbers and booleans only
            raise TypeError(f"{where}: an array of {a.dtype} cannot be checkpointed.")
        dtype, at = a.dtype.name, self.sizes.get(a.dtype.name, 0)
        self.flat.setdefault(dtype, []).append(a.reshape(-1))
        self.sizes[dtype] = at + a.size
        return {"$array": dtype, "at": at, "shape": list(a.shape)}

    def tree(self) -> dict:
        return {**{k: np.concatenate(v) for k, v in self.flat.items()}, **self.spanning}


def _encode(x, arrays: _Arrays, where: str):
    if type(x) in _SCALARS:
        return x
    if _is_array(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            key = _encode(jax.random.key_data(x), arrays, where)
            return {"$key": key, "impl": str(jax.random.key_impl(x))}
        return arrays.add(x, where)
    if type(x) is dict:
        if not all(isinstance(k, str) for k in x):
            raise TypeError(f"{where}: checkpointed dicts need string keys.")
        return {"$dict": {k: _encode(v, arrays, f"{where}.{k}") for k, v in x.items()}}
    if type(x) in (list, tuple):
        items = [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(x)]
        return items if type(x) is list else {"$tuple": items}
    # Any other pytree (an Equinox module, an optax state): its leaves, rebuilt on loading from
    # the fresh state's node at the same place. Leaves that are neither arrays nor scalars
    # (functions held by a module) come from there too.
    leaves, treedef = jax.tree.flatten(x)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        raise TypeError(f"{where}: cannot checkpoint a {type(x).__name__}.")
    encoded = [
        _encode(v, arrays, f"{where}<{i}>") if _is_array(v) or type(v) in _SCALARS else {"$same": 1}
        for i, v in enumerate(leaves)
    ]
    return {"$tree": encoded, "type": type(x).__qualname__}


def _decode(node, arrays, like, where: str, path: pathlib.Path):
    def fail(message):
        raise CheckpointError(f"{path}: {where or 'the state'} {message}")

    if not isinstance(node, dict):
        if isinstance(node, list):
            likes = like if isinstance(like, list) else []
            return [
                _decode(v, arrays, likes[i] if i < len(likes) else None, f"{where}[{i}]", path)
                for i, v in enumerate(node)
            ]
        return node
    if "$dict" in node:
        likes = like if isinstance(like, dict) else {}
        return {
            k: _decode(v, arrays, likes.get(k), f"{where}.{k}".lstrip("."), path)
            for k, v in node["$dict"].items()
        }
    if "$tuple" in node:
        likes = like if isinstance(like, tuple) else ()
        return tuple(
            _decode(v, arrays, likes[i] if i < len(likes) else None, f"{where}[{i}]", path)
            for i, v in enumerate(node["$tuple"])
        )
    if "$array" in node:
        a = arrays[node["$array"]]
        if "at" in node:
            shape = tuple(node["shape"])
            a = a[node["at"] : node["at"] + math.prod(shape)].reshape(shape)
        if "dtype" in node:  # version 1: bfloat16 and the like as their bits
            a = a.view(jax.numpy.dtype(node["dtype"]))
        if _is_array(like) and (np.shape(like) != a.shape or like.dtype != a.dtype):
            fail(
                f"is {a.dtype}{list(a.shape)} where this run has {like.dtype}"
                f"{list(np.shape(like))}: the checkpoint is from a run with other options."
            )
        return a
    if "$key" in node:
        data = _decode(node["$key"], arrays, None, where, path)
        return jax.random.wrap_key_data(data, impl=node["impl"])
    if "$tree" in node:
        if like is None:
            fail(f"holds a {node['type']} where this run's fresh state has nothing to match it.")
        like_leaves, treedef = jax.tree.flatten(like)
        if type(like).__qualname__ != node["type"] or len(like_leaves) != len(node["$tree"]):
            fail(
                f"holds a {node['type']} of {len(node['$tree'])} leaves where this run has a "
                f"{type(like).__qualname__} of {len(like_leaves)}."
            )
        leaves = [
            fresh if v == {"$same": 1} else _decode(v, arrays, fresh, f"{where}<{i}>", path)
            for i, (v, fresh) in enumerate(zip(node["$tree"], like_leaves))
        ]
        return jax.tree.unflatten(treedef, leaves)
    fail("is not in the checkpoint format.")


def save_tree(path: pathlib.Path, tree: Any, *, run_id: str | None = None) -> None:
    """Writes `tree` as one orbax checkpoint, the directory `path` (which must not exist yet),
    atomically and as data only. Dicts (string keys), lists, tuples, arrays, `None`, booleans,
    numbers and strings are stored as such; any other pytree node (an Equinox module, an optax
    state) by its leaves, and rebuilt by `load_tree` from a fresh state of the same shape.

    With several processes, every one calls it with the same state: each writes the shards it
    holds of the arrays that span processes, process 0 the rest.

    `run_id` (the run's id from `run.json`) is stored beside the structure, so that a
    checkpoint copied into another run's directory is recognised there (see `load_tree`)."""
    ocp = _orbax()
    arrays = _Arrays()
    structure = {"format": _FORMAT, "version": _VERSION, "tree": _encode(tree, arrays, "")}
    items = arrays.tree()
    structure["arrays"] = list(items)
    if run_id is not None:
        structure["run_id"] = run_id
    # orbax refuses to save no arrays, and a stage's results may be Python numbers alone.
    items = items or {"none": np.zeros((), np.uint8)}
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    checkpointer.save(pathlib.Path(path).absolute(), items, custom_metadata=structure)


def _read(path: pathlib.Path) -> tuple[Any, dict]:
    """The structure and the arrays of the checkpoint at `path`, as NumPy arrays on every
    process, whichever sharding they were saved with (`Run.loop`'s `prepare` puts them on
    devices)."""
    if path.suffix == ".npz":  # version 1
        with np.load(path, allow_pickle=False) as z:
            structure = json.loads(bytes(z["__structure__"]).decode())
            return structure, {k: z[k] for k in z.files if k != "__structure__"}
    # The structure is in orbax's step metadata, read as the file it is (the same in orbax 0.11
    # and 0.12): what `Checkpointer.metadata` returns changed between them.
    structure = json.loads((path / _STEP_METADATA).read_text())["custom_metadata"]
    names = structure.get("arrays") if isinstance(structure, dict) else None
    if not names:
        return structure, {}
    ocp = _orbax()
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    restore_args = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in names}
    args = ocp.args.PyTreeRestore(restore_args=restore_args)
    return structure, checkpointer.restore(path.absolute(), args=args)


def load_tree(
    path: pathlib.Path, like: Any = None, *, run_id: str | None = None, unmarked: bool = True
) -> Any:
    """Reads what `save_tree` wrote (or a `.npz` of version 1). Pytree nodes other than dicts,
    lists and tuples are rebuilt from `like` (the fresh state) at the same place, whose array
    shapes and dtypes must match.

    **Arguments:**

    - `path`: the checkpoint's directory (or `.npz` file).
    - `like`: the fresh state.
    - `run_id`: the id of the run reading it; a checkpoint that another run wrote is refused
        (`None`: not checked).
    - `unmarked`: whether a checkpoint without a run id (written before run ids) is accepted.

    **Raises:**

    `CheckpointError`, naming the file, if it is truncated, corrupt, not in this format (a
    pickle is never loaded), another run's, or does not fit `like`.
    """
    path = pathlib.Path(path)
    try:
        structure, arrays = _read(path)
    except Exception as error:  # orbax, TensorStore and zipfile raise many kinds for damage
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: {error}). It may be "
            "truncated or corrupt; delete it, or start afresh with --overwrite."
        ) from error
    if not isinstance(structure, dict) or structure.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this format.")
    if structure.get("version") not in (1, _VERSION):
        raise CheckpointError(f"{path}: checkpoint format version {structure.get('version')}.")
    if run_id is not None:
        _check_owner(path, structure.get("run_id"), run_id, unmarked)
    return _decode(structure["tree"], arrays, like, "", path)


def _check_owner(path: pathlib.Path, owner: Any, run_id: str, unmarked: bool) -> None:
    """Refuses a checkpoint of another run: copied from a run of the same experiment with
    other options (another seed), its arrays have the right shapes, so nothing else would
    notice that the resumed run continues someone else's state."""
    if owner == run_id or (owner is None and unmarked):
        return
    whose = "carries no run id" if owner is None else f"was written by run {owner}"
    raise CheckpointError(
        f"{path} belongs to another run: it {whose}, and this run's id (in run.json) is "
        f"{run_id}. It was copied from another run's directory: delete it (its state is then "
        "computed afresh), or resume the run it came from."
    )


def _last_save(folder: pathlib.Path) -> int:
    """The number of the last complete save in `folder`, 0 if none. Every process gets process
    0's answer: they must all read and write the same save, and a shared file system may list
    a folder to one host as it was a moment ago."""
    numbers = [int(p.name) for p in folder.glob("*") if p.name.isascii() and p.name.isdigit()]
    last = max(numbers, default=0)
    if jax.process_count() == 1:
        return last
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(last)))


class Checkpoints:
    """Named states under `<out>/checkpoints/`, in the data-only format of `save_tree`.

    Arrays are read back as NumPy arrays, so a checkpoint loads without a device and feeds
    back into jitted code unchanged (same dtypes, same values, hence the same trajectory).
    """

    def __init__(self, out: pathlib.Path, run_id: str | None = None, *, unmarked: bool = True):
        """`run_id`: the run's id, stored in every checkpoint saved and required of every
        checkpoint loaded (`None`: neither). `unmarked`: whether checkpoints without a run id
        (a run started before run ids) are loaded."""
        self.directory = pathlib.Path(out) / CHECKPOINTS
        self.run_id = run_id
        self.unmarked = unmarked

    def path(self, name: str) -> pathlib.Path:
        """The folder of `name`'s saves."""
        return self.directory / name

    def save(self, name: str, state: Any) -> None:
        """Stores `state` under `name` as a new save; the ones before it, and what a killed
        save left, are deleted once it is complete. Every process calls it (see
        `save_tree`)."""
        folder = self.path(name)
        number = _last_save(folder) + 1
        save_tree(folder / str(number), state, run_id=self.run_id)
        if is_main_process():
            for old in folder.iterdir():
                if old.name != str(number):
                    # Left behind if it cannot be deleted: loading takes the last save anyway.
                    shutil.rmtree(old, ignore_errors=True)
            (self.directory / f"{name}.npz").unlink(missing_ok=True)  # version 1, now stale

    def load(self, name: str, like: Any = None) -> Any:
        """The state saved last under `name`, or `None` if there is none. `like` is a fresh
        state, the template for what is not a dict, list or tuple (see `load_tree`). A `.npz`
        checkpoint of version 1 (before orbax) is read too.

        **Raises:**

        `CheckpointError` for an unreadable checkpoint, for another run's (copied here), and
        for a pickle left by an older version (pickles can run code, so they are never
        opened).
        """
        number = _last_save(self.path(name))
        if number:
            path = self.path(name) / str(number)
        else:
            path = self.directory / f"{name}.npz"
        if number or path.exists():
            return load_tree(path, like, run_id=self.run_id, unmarked=self.unmarked)
        legacy = self.directory / f"{name}.pkl"
        if legacy.exists():
            raise CheckpointError(
                f"{legacy}: a pickled checkpoint from an older version of the experiments. "
                "Pickles can run code, so they are not opened: start afresh with --overwrite."
            )
        return None
