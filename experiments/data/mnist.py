"""MNIST from the official IDX files (LeCun, Cortes & Burges).

Only the 10,000-image test set is in `../shared/data/mnist`; experiments that need MNIST split
it with `split` (e.g. 4000 / 2000 / 4000 for data hyper-cleaning).
"""

import gzip
import pathlib
from typing import Literal

import numpy as np

from ._files import DataError, PathLike, find, reading


DOWNLOAD = (
    "http://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
# The third byte of an IDX magic number gives the element type, the fourth the number of dims.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike, *, expected_ndim: int | None = None) -> np.ndarray:
    """Reads an IDX file (gzipped when its name ends in `.gz`).

    The header is a magic number `00 00 TT DD` (`TT` the element type, `DD` the number of
    dimensions) followed by `DD` big-endian `uint32` sizes, then the data in C order.

    **Raises:**

    `DataError` (a `ValueError`) naming the file when it cannot be read (e.g. a truncated or
    corrupt gzip stream), and `ValueError` naming it when the magic number, the number of
    dimensions or the data length is wrong.
    """
    path = pathlib.Path(path)
    with reading(path):
        return _read_idx(path, expected_ndim)


def _read_idx(path: pathlib.Path, expected_ndim: int | None) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: bad magic number {raw[:4].hex()}.")
    ndim = raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: expected an IDX file with {expected_ndim} dims, got {ndim}.")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(
            f"{path}: the header gives shape {shape} ({dtype}) but {len(raw) - offset} data bytes "
            "follow; the file is truncated or corrupt."
        )
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist(
    data_dir: PathLike | None = None, *, split: Literal["train", "test"] = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images and labels.

    **Arguments:**

    - `data_dir`: the directory holding `mnist/<file>.gz`, the only place looked at; by default
        `$BILEVAX_DATA`, or `../shared/data` when that is not set.
    - `split`: `"test"` (10,000 digits, the files in `../shared/data`) or `"train"` (60,000;
        downloaded by the user).

    **Returns:**

    `(images, labels)`: `uint8` images of shape `(N, 28, 28)`, 0 background and 255 ink, and
    `int32` labels in 0..9 of shape `(N,)`.

    **Raises:**

    `FileNotFoundError` for a missing file, `ChecksumError` for one that differs from
    `SHA256SUMS`, and `DataError` or `ValueError` for one that cannot be read or has the wrong
    shape, each naming the file and saying where to download it.
    """
    if split not in _FILES:
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
    image_file, label_file, n = _FILES[split]
    images_path = find(f"mnist/{image_file}", data_dir, download=DOWNLOAD)
    labels_path = find(f"mnist/{label_file}", data_dir, download=DOWNLOAD)
    with reading(images_path, DOWNLOAD):
        images = _read_idx(images_path, expected_ndim=3)
    with reading(labels_path, DOWNLOAD):
        labels = _read_idx(labels_path, expected_ndim=1)
    if images.shape != (n, 28, 28) or labels.shape != (n,) or images.dtype != np.uint8:
        raise DataError(
            f"MNIST {split}: expected {n} uint8 28x28 images and {n} labels, got images "
            f"{images.shape} {images.dtype} ({images_path}) and labels {labels.shape} "
            f"({labels_path}). Download them again from {DOWNLOAD}."
        )
    if labels.max(initial=0) > 9:
        raise DataError(f"{labels_path}: labels outside 0..9. Download it again from {DOWNLOAD}.")
    return images, labels.astype(np.int32)
