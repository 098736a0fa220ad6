"""Lake et al.'s 20 official 20-way one-shot classification runs (`all_runs.zip`)."""

import io
import re
import zipfile
from typing import NamedTuple

import numpy as np
from PIL import Image

from ._files import DataError, PathLike, find, reading
from .omniglot import preprocess


DOWNLOAD = (
    "https://github.com/brendenlake/omniglot/tree/master/python/one-shot-classification "
    "(all_runs.zip)"
)
NUM_RUNS, NUM_WAYS = 20, 20
_LINE = re.compile(r"run(\d+)/test/item(\d+)\.png\s+run(\d+)/training/class(\d+)\.png")


class OneShotRuns(NamedTuple):
    """The runs, preprocessed as `Characters` are (`uint8`, 255 = ink).

    **Fields:**

    - `support`: shape `(20, 20, size, size)`: run `r`'s `training/classNN.png` at `[r, NN-1]`,
        one drawing of each of the run's 20 characters.
    - `query`: shape `(20, 20, size, size)`: run `r`'s `test/itemNN.png` at `[r, NN-1]`, another
        drawer's drawing of one of them.
    - `answer`: `int64`, shape `(20, 20)`: `answer[r, i]` is the index of the support image of
        query `i`'s character (from `class_labels.txt`).
    """

    support: np.ndarray
    query: np.ndarray
    answer: np.ndarray


def load_one_shot_runs(data_dir: PathLike | None = None, *, size: int = 28) -> OneShotRuns:
    """Reads `omniglot/all_runs.zip` from the data directory (`data_dir`, else `$BILEVAX_DATA`,
    else `../shared/data`: only that one)."""
    path = find("omniglot/all_runs.zip", data_dir, download=DOWNLOAD)
    papers = np.empty((NUM_RUNS, 2, NUM_WAYS, 105, 105), bool)
    answer = np.full((NUM_RUNS, NUM_WAYS), -1, np.int64)

    with reading(path, DOWNLOAD), zipfile.ZipFile(path) as z:

        def read(name: str) -> np.ndarray:
            with Image.open(io.BytesIO(z.read(name))) as image:
                return np.asarray(image.convert("1"))

        for r in range(NUM_RUNS):
            run = f"run{r + 1:02d}"
            for i in range(NUM_WAYS):
                papers[r, 0, i] = read(f"{run}/training/class{i + 1:02d}.png")
                papers[r, 1, i] = read(f"{run}/test/item{i + 1:02d}.png")
            for line in z.read(f"{run}/class_labels.txt").decode().splitlines():
                if not line.strip():
                    continue
                match = _LINE.fullmatch(line.strip())
                if match is None or {int(match[1]), int(match[3])} != {r + 1}:
                    raise ValueError(f"{path}: unexpected line in {run}/class_labels.txt: {line!r}")
                answer[r, int(match[2]) - 1] = int(match[4]) - 1
    for r in range(NUM_RUNS):
        if sorted(answer[r]) != list(range(NUM_WAYS)):
            raise DataError(
                f"{path}: run{r + 1:02d}/class_labels.txt is not a matching. Download it again "
                f"from {DOWNLOAD}."
            )
    images = preprocess(papers, size)
    return OneShotRuns(images[:, 0], images[:, 1], answer)
