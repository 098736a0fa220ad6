"""The data loaders of `experiments/data` on the real files in `../shared/data`: checksums and
their error messages, MNIST's IDX parsing, Omniglot from npz and from the official PNG zips, the
character split, rotations, the episode sampler, Lake's one-shot runs and the cache."""

import os
import shutil

import numpy as np
import pytest

from experiments import data as bd
from experiments._common import DEFAULT_DATA
from experiments.data import _files, omniglot


pytestmark = pytest.mark.skipif(
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


def test_checksums_of_real_files():
    sums = _sums()
    assert len(sums) == 8
    for relpath, digest in sums.items():
        path = bd.find(relpath, download="nowhere")
        assert path == DEFAULT_DATA / relpath
        assert bd.sha256(path) == digest


def test_corrupt_copy_names_the_file(tmp_path):
    relpath = "mnist/t10k-labels-idx1-ubyte.gz"
    (tmp_path / "mnist").mkdir()
    shutil.copy(DEFAULT_DATA / "SHA256SUMS", tmp_path / "SHA256SUMS")
    copy = tmp_path / relpath
    shutil.copy(DEFAULT_DATA / relpath, copy)
    assert bd.find(relpath, tmp_path, download="URL") == copy  # intact, and its digest cached
    raw = bytearray(copy.read_bytes())
    raw[100] ^= 0xFF
    copy.write_bytes(bytes(raw))
    # Same size: only the mtime tells the digest cache that the file changed. Coarse filesystem
    # clocks could leave it equal within a few milliseconds, so move it on explicitly.
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(bd.ChecksumError, match=str(copy)) as info:
        bd.load_mnist(tmp_path)
    assert "yann.lecun.com" in str(info.value)


def test_missing_file_gives_download_address(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        bd.load_mnist(tmp_path, split="train")  # only the test set is in ../shared/data
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path) in message
    assert "http://yann.lecun.com/exdb/mnist/" in message
    with pytest.raises(FileNotFoundError, match="github.com/brendenlake/omniglot"):
        bd.load_omniglot_zip(["images_background.zip"], tmp_path)


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


@pytest.mark.parametrize("name", SMALL)
def test_zip_loader(name):
    c = bd.load_omniglot_zip([name])
    assert len(c) == SMALL_COUNTS[name] and len(np.unique(c.alphabets)) == 5
    _check_protocol(c)


def test_npz_loader(chars):
    assert len(chars) == 1623
    np.testing.assert_array_equal(chars.ids, np.arange(1, 1624))
    assert len(set(chars.names)) == 1623 and len(np.unique(chars.alphabets)) == 50
    _check_protocol(chars)


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


def test_rotations_are_exact(small):
    rotated = bd.rotate(small)
    assert len(rotated) == 4 * len(small)
    for r in range(4):
        got = rotated.take(np.arange(len(small)) * 4 + r)
        np.testing.assert_array_equal(got.images, np.rot90(small.images, r, axes=(2, 3)))
        np.testing.assert_array_equal(got.ids, small.ids)
        assert np.all(got.rotations == 90 * r)


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


def test_episodes_are_uniform(splits):
    # 3000 episodes of 5 classes from 400: each class ~37.5 times; labels are not tied to the
    # class index order.
    e = bd.sample_episodes(splits[1].images, 5, 1, 1, 3000, 1)
    counts = np.bincount(e.classes.ravel(), minlength=400)
    assert counts.min() > 10 and counts.max() < 75
    assert abs(e.classes[:, 0].mean() - 199.5) < 10


def test_one_shot_runs():
    runs = bd.load_one_shot_runs()
    assert runs.support.shape == runs.query.shape == (20, 20, 28, 28)
    assert runs.support.dtype == np.uint8
    assert runs.answer.shape == (20, 20)
    for answer in runs.answer:
        assert sorted(answer) == list(range(20))
    assert 0.05 < runs.query.mean() / 255 < 0.12  # inverted like the characters


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
