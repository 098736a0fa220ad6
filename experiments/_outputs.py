"""A run's outputs: JSON (arrays as lists) and PNG figures, written atomically by process 0."""

import io
import json
import pathlib
from typing import Any

import jax
import numpy as np

from ._atomic import atomic_write
from ._distributed import is_main_process


def to_json(x: Any) -> Any:
    """`json.dumps`'s `default`: NumPy and JAX arrays and scalars as numbers and lists, paths
    as strings, dataclass-like objects with a `to_dict` by it."""
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return np.asarray(x).tolist()
    if isinstance(x, pathlib.Path):
        return str(x)
    if hasattr(x, "to_dict"):
        return x.to_dict()
    raise TypeError(f"Cannot write {type(x).__name__} to JSON.")


def write_json(path: pathlib.Path, obj: Any) -> pathlib.Path:
    """Writes `obj` as indented JSON, atomically (on process 0 only); returns the path."""
    path = pathlib.Path(path)
    if is_main_process():
        text = json.dumps(obj, indent=2, default=to_json, allow_nan=True)
        atomic_write(path, (text + "\n").encode())
    return path


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: pathlib.Path, dpi: int = 120, rect=(0.0, 0.0, 1.0, 1.0)) -> pathlib.Path:
    """Lays out `fig` within `rect` (left, bottom, right, top, as fractions of the figure: room
    left outside it for a note), writes it as a PNG atomically (on process 0 only), and closes
    it."""
    fig.tight_layout(rect=rect)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    if is_main_process():
        atomic_write(pathlib.Path(path), buffer.getvalue())
    return pathlib.Path(path)
