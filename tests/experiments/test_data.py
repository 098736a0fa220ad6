"""The data loaders of `experiments/data`. On tiny synthetic files: one data directory only
(no fallback that mixes places), checksums and the digest cache, warnings for unchecked files,
errors that name the file. On the real files in `../shared/data` (skipped without them):
MNIST's IDX parsing, Omniglot from npz and from the official PNG zips, the character split,
rotations, the episode sampler, Lake's one-shot runs and the cache."""

import gzip
import hashlib
import io
import json
import os
import re
import time
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

from experiments import data as bd
from experiments.data import DEFAULT_DATA, _files, mnist, omniglot


needs_shared = pytest.mark.skipif(
    not (DEFAULT_DATA / "SHA256SUMS").is_file(),
    reason=f"the shared data sets are not at {DEFAULT_DATA}",
)
SMALL = ("images_background_small1.zip", "images_background_small2.zip")
# Characters and alphabets in each small zip: 5 alphabets each, Greek and Latin in both.
SMALL_COUNTS = {SMALL[0]: 136, SMALL[1]: 156}
SMALL_UNION = 242


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    # Tests must neither read a stale user cache nor write to it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BILEVAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("BILEVAX_DATA", raising=False)
        yield


@pytest.fixture(scope="session")
def chars():
    return bd.load_omniglot()


@pytest.fixture(scope="session")
def small():
    return bd.load_omniglot_zip(SMALL)


@pytest.fixture(scope="session")
def splits(chars):
    return bd.split_characters(chars, seed=0)


def _sums():
    lines = (DEFAULT_DATA / "SHA256SUMS").read_text().split("\n")
    return dict(reversed(line.split()) for line in lines if line.strip())


@needs_shared
def test_checksums_of_real_files():
    sums = _sums()
    assert len(sums) == 8
    for relpath, digest in sums.items():
        path = bd.find(relpath, download="nowhere")
        assert path == DEFAULT_DATA / relpath
        assert bd.sha256(path) == digest


def test_missing_file_gives_download_address(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        bd.load_mnist(tmp_path, split="train")  # only the test set is in ../shared/data
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path) in message
    assert "http://yann.lecun.com/exdb/mnist/" in message
    with pytest.raises(FileNotFoundError, match="github.com/brendenlake/omniglot"):
        bd.load_omniglot_zip(["images_background.zip"], tmp_path)


# Tiny synthetic data directories: an MNIST test set of blank digits (the loader wants 10,000)
# and small Omniglot-shaped files. Hashing, gzip and zip stay in the milliseconds.
MNIST_FILES = ("mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz")
MNIST_URL = "yann.lecun.com"
OMNIGLOT_URL = "github.com/brendenlake/omniglot"


def _idx_gz(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return gzip.compress(header + array.tobytes(), compresslevel=1, mtime=0)


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _omniglot_zip(alphabet: str) -> bytes:
    # One character, 20 drawings of 105x105 white paper with a black square: the official layout.
    paper = np.ones((105, 105), bool)
    paper[40:60, 40:60] = False
    drawings = {}
    for d in range(1, 21):
        png = io.BytesIO()
        Image.fromarray(paper).save(png, "PNG")
        drawings[f"{alphabet}/character01/0001_{d:02d}.png"] = png.getvalue()
    return _zip(drawings)


def _synthetic_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 4000, np.uint8).tobytes()  # incompressible: truncation bites
    npz = io.BytesIO()
    np.savez(npz, images=np.ones((1, 20, 105, 105), bool), labels=np.zeros((1, 20), np.int64))
    ranges = {"rows": [{"alphabet": "A", "first_id": 1, "last_id": 1623}]}
    return {
        MNIST_FILES[0]: _idx_gz(np.zeros((10_000, 28, 28), np.uint8), 0x08),
        MNIST_FILES[1]: _idx_gz((np.arange(10_000) % 10).astype(np.uint8), 0x08),
        "omniglot/images_background.npz": npz.getvalue(),
        "omniglot/images_evaluation.npz": npz.getvalue(),
        "omniglot/alphabet_id_ranges.json": json.dumps(ranges).encode(),
        "omniglot/images_background_small1.zip": _omniglot_zip("Data"),
        "omniglot/all_runs.zip": _zip({"run01/class_labels.txt": blob}),
    }


def _make_data_dir(root, *, sums: bool = True, skip: tuple[str, ...] = ()):
    lines = []
    for relpath, data in _synthetic_files().items():
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {relpath}\n")
        if relpath not in skip:
            (root / relpath).parent.mkdir(parents=True, exist_ok=True)
            (root / relpath).write_bytes(data)
    if sums:
        (root / "SHA256SUMS").write_text("".join(lines))
    return root


@pytest.fixture
def default_data(tmp_path, monkeypatch):
    """A complete, checked data directory standing in for `../shared/data`: whatever a test
    gets from it is a fallback that should not have happened."""
    root = _make_data_dir(tmp_path / "default")
    monkeypatch.setattr(_files, "DEFAULT_DATA", root)
    return root


def test_synthetic_data_loads(default_data, tmp_path, monkeypatch):
    # The baseline of the tests below: complete directories load, found where they say.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, labels = bd.load_mnist()
        assert images.shape == (10_000, 28, 28) and labels[:3].tolist() == [0, 1, 2]
        assert bd.find(MNIST_FILES[0], download="x") == default_data / MNIST_FILES[0]
        env = _make_data_dir(tmp_path / "env")
        monkeypatch.setenv("BILEVAX_DATA", str(env))
        assert bd.find(MNIST_FILES[0], download="x") == env / MNIST_FILES[0]
        assert bd.data_root(default_data)[0] == default_data


@pytest.mark.parametrize("how", ["data_dir", "BILEVAX_DATA"])
def test_explicit_missing_data_dir_is_an_error(default_data, tmp_path, monkeypatch, how):
    missing = tmp_path / "typo"
    if how == "BILEVAX_DATA":
        monkeypatch.setenv("BILEVAX_DATA", str(missing))
    else:  # `$BILEVAX_DATA` set to a complete directory must not be used either.
        monkeypatch.setenv("BILEVAX_DATA", str(default_data))
    with pytest.raises(FileNotFoundError) as info:
        bd.load_mnist(missing if how == "data_dir" else None)
    message = str(info.value)
    assert str(missing / MNIST_FILES[0]) in message and f"{missing} (" in message
    assert "does not exist" in message
    assert how in message and MNIST_URL in message and str(default_data) not in message


@pytest.mark.parametrize("missing", MNIST_FILES)
def test_directory_missing_one_file_is_an_error(default_data, tmp_path, missing):
    partial = _make_data_dir(tmp_path / "partial", skip=(missing,))
    with pytest.raises(FileNotFoundError) as info:
        bd.load_mnist(partial)
    message = str(info.value)
    assert str(partial / missing) in message and MNIST_URL in message
    assert str(default_data) not in message


def _corrupt_keeping_size_and_mtime(path):
    before = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    # The kernel stamps ctime from a clock that may tick only every few milliseconds; touch the
    # file until the change shows (a real corruption is seldom within a tick of the last check).
    deadline = time.monotonic() + 5
    while path.stat().st_ctime_ns == before.st_ctime_ns and time.monotonic() < deadline:
        time.sleep(0.005)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns


def test_corruption_keeping_the_mtime_is_caught(tmp_path, monkeypatch):
    root = _make_data_dir(tmp_path / "data")
    path = root / MNIST_FILES[1]
    bd.load_mnist(root)  # intact: its digest is now cached in memory and on disk
    digests = json.loads((_files.cache_dir() / "sha256.json").read_text())
    assert digests[str(path.resolve())]["size"] == path.stat().st_size
    _corrupt_keeping_size_and_mtime(path)
    with pytest.raises(bd.ChecksumError, match=re.escape(str(path))) as info:
        bd.load_mnist(root)
    assert MNIST_URL in str(info.value)
    monkeypatch.setattr(_files, "_memo", {})  # a new process: only the on-disk cache
    with pytest.raises(bd.ChecksumError, match=re.escape(str(path))):
        bd.load_mnist(root)


LOADERS = {
    MNIST_FILES[0]: (lambda root: bd.load_mnist(root), MNIST_URL),
    "omniglot/images_background.npz": (lambda root: bd.load_omniglot(root), OMNIGLOT_URL),
    "omniglot/alphabet_id_ranges.json": (lambda root: bd.load_omniglot(root), OMNIGLOT_URL),
    "omniglot/images_background_small1.zip": (
        lambda root: bd.load_omniglot_zip(["images_background_small1.zip"], root),
        OMNIGLOT_URL,
    ),
    "omniglot/all_runs.zip": (lambda root: bd.load_one_shot_runs(root), OMNIGLOT_URL),
}


@pytest.mark.parametrize("relpath", LOADERS)
def test_truncated_file_without_sums_warns_and_names_it(tmp_path, relpath):
    # Unchecked, the truncation surfaces only when the file is parsed: in gzip (EOFError),
    # zipfile (BadZipFile) or json. The warning says what was not checked, the error which file.
    root = _make_data_dir(tmp_path / "data", sums=False)
    path = root / relpath
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    load, url = LOADERS[relpath]
    with (
        pytest.warns(bd.UncheckedDataWarning) as record,
        pytest.raises(bd.DataError, match=re.escape(str(path))) as info,
    ):
        load(root)
    message = str(info.value)
    assert "not checked against a `SHA256SUMS`" in message and url in message
    warned = [str(w.message) for w in record if issubclass(w.category, bd.UncheckedDataWarning)]
    assert any(w.startswith(f"{path} is read without a checksum check") for w in warned)
    assert all(f"{root / 'SHA256SUMS'} does not exist" in w for w in warned)


def test_unlisted_file_warns(tmp_path):
    root = _make_data_dir(tmp_path / "data")
    sums = root / "SHA256SUMS"
    sums.write_text("".join(line for line in sums.open() if MNIST_FILES[1] not in line))
    with pytest.warns(bd.UncheckedDataWarning) as record:
        bd.load_mnist(root)
    assert len(record) == 1
    assert f"{sums} does not list {MNIST_FILES[1]!r}" in str(record[0].message)


def test_zip_name_is_looked_up_in_the_data_directory_only(default_data, tmp_path, monkeypatch):
    # A bare name is the data directory's file, even when the working directory has one of that
    # name; a path with a directory part is that file only.
    name = "images_background_small1.zip"
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(_omniglot_zip("WorkingDirectory"))
    chars = bd.load_omniglot_zip([name], cache=False)
    assert chars.names.tolist() == ["Data/character01"] and chars.images.shape == (1, 20, 28, 28)
    assert bd.load_omniglot_zip([f"./{name}"], cache=False).names[0].startswith("Working")
    missing = tmp_path / "elsewhere" / name
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        bd.load_omniglot_zip([missing])


def test_loader_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(bd.DataError, match=re.escape(str(bad))):
        mnist.read_idx(bad)


@needs_shared
def test_mnist():
    images, labels = bd.load_mnist()
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and np.all(images[:, 0, :] == 0)  # ink bright on a black border
    assert 0.1 < images.mean() / 255 < 0.15


def test_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(bytes([0, 0, 0x08, 3]) + np.array([2, 2, 2], ">u4").tobytes() + b"\0" * 7)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        bd.read_idx(bad)
    bad.write_bytes(bytes([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="bad magic number"):
        bd.read_idx(bad)
    good = tmp_path / "good"
    good.write_bytes(bytes([0, 0, 0x0B, 2]) + np.array([2, 3], ">u4").tobytes() + b"\1\2" * 6)
    np.testing.assert_array_equal(bd.read_idx(good), np.full((2, 3), 0x0102, np.int16))


def _check_protocol(c):
    assert c.images.dtype == np.uint8 and c.images.shape[1:] == (20, 28, 28)
    assert c.images.min() == 0 and c.images.max() == 255
    # Strokes bright: ink covers ~8% of the paper, the border is paper.
    assert 0.05 < c.images.mean() / 255 < 0.12
    assert c.images[..., 0, :].mean() < 2
    assert np.all(c.rotations == 0)


@needs_shared
@pytest.mark.parametrize("name", SMALL)
def test_zip_loader(name):
    c = bd.load_omniglot_zip([name])
    assert len(c) == SMALL_COUNTS[name] and len(np.unique(c.alphabets)) == 5
    _check_protocol(c)


@needs_shared
def test_npz_loader(chars):
    assert len(chars) == 1623
    np.testing.assert_array_equal(chars.ids, np.arange(1, 1624))
    assert len(set(chars.names)) == 1623 and len(np.unique(chars.alphabets)) == 50
    _check_protocol(chars)


@needs_shared
def test_npz_and_zip_agree(chars, small):
    # The PNG zips hold exactly the pixels of the npz, and both go through `preprocess`, so the
    # tolerance is zero.
    assert len(small) == SMALL_UNION
    same = chars.take(small.ids - 1)
    np.testing.assert_array_equal(same.ids, small.ids)
    np.testing.assert_array_equal(same.names, small.names)
    np.testing.assert_array_equal(same.images, small.images)


def test_preprocess_inverts_and_resizes():
    paper = np.ones((2, 105, 105), bool)
    paper[1, 30:75, 40:65] = False  # a thick vertical stroke
    out = bd.preprocess(paper)
    assert out.shape == (2, 28, 28) and out.dtype == np.uint8
    assert np.all(out[0] == 0)
    assert out[1, 14, 14] == 255 and out[1, 14, 0] == 0 and out[1, 0, 14] == 0


@needs_shared
def test_character_split(chars, splits):
    train, val, test = bd.split_characters(chars, seed=0, rotations=False)
    assert (len(train), len(val), len(test)) == (1200, 100, 323)
    ids = [set(p.ids) for p in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 1623
    assert [len(p) for p in splits] == [4800, 400, 1292]
    for a, b in zip(splits, bd.split_characters(chars, seed=0)):
        np.testing.assert_array_equal(a.ids, b.ids)
    other = bd.split_characters(chars, seed=1, rotations=False)
    assert not np.array_equal(other[0].ids, train.ids)
    with pytest.raises(ValueError, match="sizes"):
        bd.split(10, (6, 5), seed=0)


@needs_shared
def test_rotations_are_exact(small):
    rotated = bd.rotate(small)
    assert len(rotated) == 4 * len(small)
    for r in range(4):
        got = rotated.take(np.arange(len(small)) * 4 + r)
        np.testing.assert_array_equal(got.images, np.rot90(small.images, r, axes=(2, 3)))
        np.testing.assert_array_equal(got.ids, small.ids)
        assert np.all(got.rotations == 90 * r)


@needs_shared
@pytest.mark.parametrize("n, k, q", [(5, 1, 15), (20, 5, 5), (5, 5, 15)])
def test_episodes(splits, n, k, q):
    split = splits[1]  # meta-validation: 400 classes
    batch = 6
    e = bd.sample_episodes(split.images, n, k, q, batch, np.random.default_rng(0))
    assert e.support.shape == (batch, n * k, 28, 28, 1) and e.support.dtype == np.float32
    assert e.query.shape == (batch, n * q, 28, 28, 1) and e.query.dtype == np.float32
    assert e.support_labels.shape == (batch, n * k) and e.query_labels.shape == (batch, n * q)
    for labels, m in ((e.support_labels, k), (e.query_labels, q)):
        assert labels.dtype == np.int32
        assert np.all(np.apply_along_axis(np.bincount, 1, labels, minlength=n) == m)
    for b in range(batch):
        assert len(set(e.classes[b])) == n and np.all(e.classes[b] < len(split))
        for c in range(n):
            assert len(set(e.drawings[b, c])) == k + q  # support and query are disjoint
    # Every image is the split's drawing it claims to be, with the label of its class.
    x = split.as_float()[e.classes[:, :, None], e.drawings]
    np.testing.assert_array_equal(e.support.reshape(batch, n, k, 28, 28), x[:, :, :k])
    np.testing.assert_array_equal(e.query.reshape(batch, n, q, 28, 28), x[:, :, k:])
    # Classes come from the requested split only: no other split holds these ids.
    ids = set(split.ids[e.classes].ravel())
    assert not ids & (set(splits[0].ids) | set(splits[2].ids))
    first, again = (bd.sample_episodes(split.images, n, k, q, batch, 0) for _ in range(2))
    np.testing.assert_array_equal(first.query, again.query)


@needs_shared
def test_episodes_are_uniform(splits):
    # 3000 episodes of 5 classes from 400: each class ~37.5 times; labels are not tied to the
    # class index order.
    e = bd.sample_episodes(splits[1].images, 5, 1, 1, 3000, 1)
    counts = np.bincount(e.classes.ravel(), minlength=400)
    assert counts.min() > 10 and counts.max() < 75
    assert abs(e.classes[:, 0].mean() - 199.5) < 10


@needs_shared
def test_one_shot_runs():
    runs = bd.load_one_shot_runs()
    assert runs.support.shape == runs.query.shape == (20, 20, 28, 28)
    assert runs.support.dtype == np.uint8
    assert runs.answer.shape == (20, 20)
    for answer in runs.answer:
        assert sorted(answer) == list(range(20))
    assert 0.05 < runs.query.mean() / 255 < 0.12  # inverted like the characters


@needs_shared
def test_second_load_comes_from_cache(chars, small, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("preprocessed again despite the cache")

    monkeypatch.setattr(omniglot, "preprocess", fail)
    for fresh, cached in ((chars, bd.load_omniglot()), (small, bd.load_omniglot_zip(SMALL))):
        for field in ("images", "ids", "names", "rotations"):
            np.testing.assert_array_equal(getattr(fresh, field), getattr(cached, field))
    monkeypatch.undo()
    uncached = bd.load_omniglot_zip(SMALL[:1], cache=False)
    np.testing.assert_array_equal(
        uncached.images, small.take(np.isin(small.ids, uncached.ids)).images
    )
    assert any(_files.cache_dir().glob("omniglot-npz-*.npz"))
