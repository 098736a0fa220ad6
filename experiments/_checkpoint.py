"""Data-only checkpoints: a state's arrays in a `.npz` and its structure as JSON, never pickles,
so that opening a run directory someone shared runs no code. Each carries the id of the run
that wrote it, and another run's is refused. Every file is written atomically.
"""

import io
import json
import pathlib
import zipfile
from typing import Any

import jax
import numpy as np

from . import _distributed
from ._atomic import atomic_write
from ._distributed import is_main_process


CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints, in its output directory


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back: truncated, corrupt, not in the data-only format,
    not the state this run expects, or another run's. The message names the file."""


_FORMAT = "bilevax-experiments-checkpoint"
_VERSION = 1
_STRUCTURE = "__structure__"
_SCALARS = (bool, int, float, str, type(None))


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _encode(x, arrays: dict, where: str):
    if type(x) in _SCALARS:
        return x
    if _is_array(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            key = _encode(jax.random.key_data(x), arrays, where)
            return {"$key": key, "impl": str(jax.random.key_impl(x))}
        a = np.asarray(x)
        name = f"a{len(arrays)}"
        if a.dtype.kind == "O":
            raise TypeError(f"{where}: an object array cannot be checkpointed.")
        if a.dtype.isbuiltin == 1:  # a NumPy type: stored as is
            arrays[name] = a
            return {"$array": name}
        arrays[name] = a.view(f"u{a.dtype.itemsize}")  # bfloat16 and the like: their bits
        return {"$array": name, "dtype": a.dtype.name}
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
        if "dtype" in node:
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
    """Writes `tree` atomically as data only: a `.npz` of its arrays, with its structure as
    JSON inside. Dicts (string keys), lists, tuples, arrays, `None`, booleans, numbers and
    strings are stored as such; any other pytree node (an Equinox module, an optax state) by
    its leaves, and rebuilt by `load_tree` from a fresh state of the same shape.

    `run_id` (the run's id from `run.json`) is stored beside the structure, so that a
    checkpoint copied into another run's directory is recognised there (see `load_tree`)."""
    arrays: dict[str, np.ndarray] = {}
    structure = {"format": _FORMAT, "version": _VERSION, "tree": _encode(tree, arrays, "")}
    if run_id is not None:
        structure["run_id"] = run_id
    text = json.dumps(structure, allow_nan=True).encode()
    buffer = io.BytesIO()
    np.savez(buffer, **{_STRUCTURE: np.frombuffer(text, np.uint8)}, **arrays)
    atomic_write(path, buffer.getvalue())


def load_tree(
    path: pathlib.Path, like: Any = None, *, run_id: str | None = None, unmarked: bool = True
) -> Any:
    """Reads what `save_tree` wrote. Pytree nodes other than dicts, lists and tuples are rebuilt
    from `like` (the fresh state) at the same place, whose array shapes and dtypes must match.

    **Arguments:**

    - `path`: the file.
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
        with np.load(path, allow_pickle=False) as z:
            structure = json.loads(bytes(z[_STRUCTURE]).decode())
            arrays = {k: z[k] for k in z.files if k != _STRUCTURE}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: {error}). It may be "
            "truncated or corrupt; delete it, or start afresh with --overwrite."
        ) from error
    if not isinstance(structure, dict) or structure.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this format.")
    if structure.get("version") != _VERSION:
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


class Checkpoints:
    """Named states under `<out>/checkpoints/`, in the data-only format of `save_tree`.

    JAX arrays are stored as NumPy arrays, so a checkpoint loads without a device and feeds
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
        return self.directory / f"{name}.npz"

    def save(self, name: str, state: Any) -> None:
        """Stores `state` under `name` (process 0 only: with several processes the state is
        replicated, and every process loads process 0's copy on `--resume`)."""
        state = _distributed.to_host(state)
        if is_main_process():
            save_tree(self.path(name), state, run_id=self.run_id)

    def load(self, name: str, like: Any = None) -> Any:
        """The state saved under `name`, or `None` if there is none. `like` is a fresh state,
        the template for what is not a dict, list or tuple (see `load_tree`).

        **Raises:**

        `CheckpointError` for an unreadable file, for another run's (copied here), and for a
        pickle left by an older version (pickles can run code, so they are never opened).
        """
        path = self.path(name)
        if path.exists():
            return load_tree(path, like, run_id=self.run_id, unmarked=self.unmarked)
        legacy = path.with_suffix(".pkl")
        if legacy.exists():
            raise CheckpointError(
                f"{legacy}: a pickled checkpoint from an older version of the experiments. "
                "Pickles can run code, so they are not opened: start afresh with --overwrite."
            )
        return None
