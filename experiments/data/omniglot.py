"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015) under the common few-shot protocol.

1623 characters from 50 alphabets, 20 drawings each, 105x105 binary images. The protocol of
Vinyals et al. (2016), Finn et al. (2017) and Franceschi et al. (2018): resize to 28x28 with
Lanczos, invert so that strokes are bright, split the characters at random 1200 / 100 / 323, and
add each character rotated by 90, 180 and 270 degrees as three new classes.

Two sources give the same `Characters`: the `.npz` files in `../shared/data/omniglot`
(`load_omniglot`) and the official PNG zips a user downloads (`load_omniglot_zip`). Both are
preprocessed once and cached as `.npz` in `cache_dir()`, keyed by the source files' SHA-256 and
the preprocessing parameters.
"""

import dataclasses
import io
import json
import os
import pathlib
import re
import zipfile
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ._files import (
    DataError,
    PathLike,
    cache_key,
    find,
    load_cached,
    reading,
    save_cached,
    sha256,
)
from ._split import split


DOWNLOAD = "https://github.com/brendenlake/omniglot/tree/master/python"
DOWNLOAD_NPZ = (
    f"{DOWNLOAD} (the .npz files hold the pixels of the official images_background.zip and "
    "images_evaluation.zip; `load_omniglot_zip` reads those zips directly)"
)
NUM_DRAWINGS = 20
SPLIT_SIZES = (1200, 100, 323)
# Bump when the preprocessing changes, so that old cache entries are not reused.
_VERSION = 1
_NPZ = (("images_background.npz", 1), ("images_evaluation.npz", 965))  # file, first char id
_PNG_NAME = re.compile(r"(\d+)_(\d+)\.png$")


@dataclasses.dataclass(frozen=True, eq=False)
class Characters:
    """A set of Omniglot classes with all their drawings.

    **Fields:**

    - `images`: `uint8`, shape `(classes, 20, size, size)`; 0 is paper and 255 is ink.
    - `ids`: `int64`, shape `(classes,)`: the official character ids 1..1623 (1..964 are the
        background set, 965..1623 the evaluation set).
    - `names`: `str`, shape `(classes,)`: `"Alphabet/characterNN"`, the official folder names.
    - `rotations`: `int64`, shape `(classes,)`: degrees counterclockwise applied to the drawings
        (all 0 until `rotate`).
    """

    images: np.ndarray
    ids: np.ndarray
    names: np.ndarray
    rotations: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def alphabets(self) -> np.ndarray:
        """Each class's alphabet name."""
        return np.array([n.split("/")[0] for n in self.names])

    def take(self, index: np.ndarray | Sequence[int]) -> "Characters":
        """The classes at `index`, in that order."""
        index = np.asarray(index)
        return Characters(
            self.images[index], self.ids[index], self.names[index], self.rotations[index]
        )

    def as_float(self) -> np.ndarray:
        """The images as `float32` in [0, 1], strokes 1."""
        return self.images.astype(np.float32) * np.float32(1 / 255)


def rotate(chars: Characters) -> Characters:
    """Each class followed by its rotations by 90, 180 and 270 degrees counterclockwise
    (`np.rot90`), as new classes: class `4 c + r` is class `c` rotated by `90 r` degrees."""
    images = np.stack([np.rot90(chars.images, r, axes=(2, 3)) for r in range(4)], axis=1)
    degrees = np.arange(4) * 90
    return Characters(
        images.reshape(-1, *chars.images.shape[1:]),
        np.repeat(chars.ids, 4),
        np.repeat(chars.names, 4),
        (chars.rotations[:, None] + degrees).reshape(-1) % 360,
    )


def split_characters(
    chars: Characters,
    sizes: Sequence[int] = SPLIT_SIZES,
    seed: int = 0,
    *,
    rotations: bool = True,
) -> tuple[Characters, ...]:
    """A seeded random split of the characters (Franceschi et al. 2018: 1200 / 100 / 323 for
    meta-train / meta-validation / meta-test), each part then augmented with `rotate` (x4)
    unless `rotations=False`. Rotations of one character always land in the same part."""
    parts = tuple(chars.take(index) for index in split(len(chars), sizes, seed))
    return tuple(rotate(p) for p in parts) if rotations else parts


def preprocess(paper: np.ndarray, size: int = 28) -> np.ndarray:
    """The protocol's image preprocessing.

    **Arguments:**

    - `paper`: `bool`, shape `(..., 105, 105)`, `True` where the paper is white (the official
        PNGs and the `.npz` files).
    - `size`: the output side.

    **Returns:**

    `uint8`, shape `(..., size, size)`: 255 - ink, resized with Lanczos (`PIL.Image.LANCZOS`).
    """
    # Invert first, on a greyscale image: PIL resizes a 1-bit image with nearest neighbour
    # whatever filter is asked for.
    ink = np.where(paper, np.uint8(0), np.uint8(255)).reshape(-1, *paper.shape[-2:])
    out = np.empty((len(ink), size, size), np.uint8)
    for i, image in enumerate(ink):
        out[i] = np.asarray(Image.fromarray(image, "L").resize((size, size), Image.LANCZOS))
    return out.reshape(*paper.shape[:-2], size, size)


def _names(ids: np.ndarray, ranges_path: pathlib.Path) -> np.ndarray:
    with reading(ranges_path, DOWNLOAD_NPZ):
        rows = json.loads(ranges_path.read_text())["rows"]
        first = np.array([r["first_id"] for r in rows], np.int64)
        last = np.array([r["last_id"] for r in rows], np.int64)
        alphabets = [str(r["alphabet"]) for r in rows]
        row = np.searchsorted(first, ids, side="right") - 1
        if np.any(row < 0) or np.any(ids > last[row]):
            raise ValueError(f"{ranges_path} does not cover every character id.")
    return np.array([f"{alphabets[r]}/character{i - first[r] + 1:02d}" for r, i in zip(row, ids)])


def load_omniglot(
    data_dir: PathLike | None = None, *, size: int = 28, cache: bool = True
) -> Characters:
    """All 1623 characters, from `omniglot/images_background.npz` and
    `omniglot/images_evaluation.npz`, preprocessed with `preprocess`, in the order of their
    official ids. Names come from `omniglot/alphabet_id_ranges.json`.

    **Arguments:**

    - `data_dir`: the data directory, the only place looked at; by default `$BILEVAX_DATA`, or
        `../shared/data` when that is not set.
    - `size`: the image side after resizing.
    - `cache`: read and write the preprocessed arrays in `cache_dir()`.
    """
    paths = [find(f"omniglot/{f}", data_dir, download=DOWNLOAD_NPZ) for f, _ in _NPZ]
    ranges = find("omniglot/alphabet_id_ranges.json", data_dir, download=DOWNLOAD_NPZ)
    key = cache_key({p.name: sha256(p) for p in paths}, {"size": size, "version": _VERSION})
    name = f"omniglot-npz-{key}.npz"
    arrays = load_cached(name) if cache else None
    if arrays is None:
        images, ids = [], []
        for path, (_, first_id) in zip(paths, _NPZ):
            with reading(path, DOWNLOAD_NPZ), np.load(path, allow_pickle=False) as f:
                paper, labels = f["images"], f["labels"]
            expected = np.arange(len(labels))[:, None]
            if paper.shape[1:] != (NUM_DRAWINGS, 105, 105) or np.any(labels != expected):
                raise DataError(
                    f"{path}: expected `images` of shape (C, 20, 105, 105) and `labels[c] == c`. "
                    f"Download it again from {DOWNLOAD_NPZ}."
                )
            images.append(preprocess(paper, size))
            ids.append(np.arange(len(labels)) + first_id)
        arrays = {"images": np.concatenate(images), "ids": np.concatenate(ids)}
        if cache:
            save_cached(name, arrays)
    ids = arrays["ids"].astype(np.int64)
    return Characters(arrays["images"], ids, _names(ids, ranges), np.zeros_like(ids))


def _read_zip(path: pathlib.Path, size: int) -> dict[str, np.ndarray]:
    with reading(path, DOWNLOAD):
        papers, ids, names = _read_zip_papers(path)
    return {"images": preprocess(papers, size), "ids": ids, "names": names}


def _read_zip_papers(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Folder layout `[root/]alphabet/characterNN/IIII_DD.png`, IIII the official character id
    # and DD the drawer.
    found: dict[int, tuple[str, dict[int, np.ndarray]]] = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            match = _PNG_NAME.search(info.filename)
            if info.is_dir() or match is None:
                continue
            alphabet, character = info.filename.split("/")[-3:-1]
            char_id, drawer = int(match[1]), int(match[2])
            with Image.open(io.BytesIO(z.read(info))) as image:
                paper = np.asarray(image.convert("1"))
            name, drawings = found.setdefault(char_id, (f"{alphabet}/{character}", {}))
            if name != f"{alphabet}/{character}" or drawer in drawings:
                raise ValueError(f"{path}: {info.filename} duplicates character {char_id}.")
            drawings[drawer] = paper
    if not found:
        raise ValueError(f"{path} holds no `alphabet/characterNN/IIII_DD.png` images.")
    ids = np.array(sorted(found))
    papers = []
    for i in ids:
        name, drawings = found[i]
        if len(drawings) != NUM_DRAWINGS:
            raise ValueError(f"{path}: {name} has {len(drawings)} drawings, not {NUM_DRAWINGS}.")
        papers.append(np.stack([drawings[d] for d in sorted(drawings)]))
    return np.stack(papers), ids, np.array([found[i][0] for i in ids])


def load_omniglot_zip(
    zips: Sequence[PathLike] = ("images_background.zip", "images_evaluation.zip"),
    data_dir: PathLike | None = None,
    *,
    size: int = 28,
    cache: bool = True,
) -> Characters:
    """Characters read straight from the official PNG zips, without extracting them.

    **Arguments:**

    - `zips`: zip files. A bare file name (`"images_background.zip"`) is looked up as
        `omniglot/<name>` in the data directory (`data_dir`, else `$BILEVAX_DATA`, else
        `../shared/data`: only that one) and checked against its `SHA256SUMS`; anything with a
        directory part (`"./images_background.zip"`, `"/data/x.zip"`) is a path, read unchecked.
        A character in several zips is kept once.
    - `data_dir`: the data directory for bare names.
    - `size`, `cache`: as in `load_omniglot`.

    **Returns:**

    The `Characters` of all zips, in the order of their official ids, preprocessed exactly as
    `load_omniglot` does.
    """
    paths = []
    for z in zips:
        given = pathlib.Path(z)
        if os.fspath(z) == given.name:  # a bare name: not "./x.zip", not "dir/x.zip"
            paths.append(find(f"omniglot/{given.name}", data_dir, download=DOWNLOAD))
        elif given.is_file():
            paths.append(given)
        else:
            raise FileNotFoundError(f"Omniglot zip {given} not found. Download it from {DOWNLOAD}.")
    parts = []
    for path in paths:
        key = cache_key({path.name: sha256(path)}, {"size": size, "version": _VERSION})
        name = f"omniglot-zip-{key}.npz"
        arrays = load_cached(name) if cache else None
        if arrays is None:
            arrays = _read_zip(path, size)
            if cache:
                save_cached(name, arrays)
        parts.append(arrays)
    ids, first = np.unique(np.concatenate([p["ids"] for p in parts]), return_index=True)
    images = np.concatenate([p["images"] for p in parts])[first]
    names = np.concatenate([p["names"] for p in parts])[first]
    ids = ids.astype(np.int64)
    return Characters(images, ids, names, np.zeros_like(ids))
