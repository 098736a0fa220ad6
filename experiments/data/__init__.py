"""Data loaders for the experiments: MNIST (IDX), Omniglot (npz, official PNG zips, Lake's
one-shot runs), seeded splits and few-shot episodes.

Files are read from one data directory: `--data-dir` when given, else `$BILEVAX_DATA` when set,
else `../shared/data`; a file missing there is an error, never looked up elsewhere. They are
checked against the `SHA256SUMS` there (an `UncheckedDataWarning` when there is none); a file
that cannot be read raises a `DataError` naming it. Preprocessed arrays are cached in
`cache_dir()`.
"""

from ._files import (
    DEFAULT_DATA as DEFAULT_DATA,
    ChecksumError as ChecksumError,
    DataError as DataError,
    UncheckedDataWarning as UncheckedDataWarning,
    cache_dir as cache_dir,
    data_dir as data_dir,
    data_root as data_root,
    find as find,
    sha256 as sha256,
)
from ._split import split as split
from .episodes import Episodes as Episodes, episodes as episodes, sample_episodes as sample_episodes
from .mnist import load_mnist as load_mnist, read_idx as read_idx
from .omniglot import (
    Characters as Characters,
    load_omniglot as load_omniglot,
    load_omniglot_zip as load_omniglot_zip,
    preprocess as preprocess,
    rotate as rotate,
    split_characters as split_characters,
)
from .omniglot_runs import OneShotRuns as OneShotRuns, load_one_shot_runs as load_one_shot_runs
