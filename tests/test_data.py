"""Datasets: built-in digits / mnist1d, and real-format loaders on tiny fixture files."""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import torch

from edge_sdk import data
from edge_sdk.data import DatasetError
from edge_sdk.data.cifar10 import UnsafePickleError, restricted_loads
from edge_sdk.data.imdb import build_vocab, encode, tokenize


def test_digits_shapes_range_and_deterministic_stratified_split():
    a, b, c = data.load("digits", seed=0), data.load("digits", seed=0), data.load("digits", seed=1)
    assert (a.name, a.num_classes, a.input_shape) == ("digits", 10, (1, 8, 8))
    xa, _ya = a.train.tensors
    assert xa.shape == (1437, 1, 8, 8) and len(a.test) == 360
    assert xa.dtype == torch.float32 and float(xa.min()) == 0.0 and float(xa.max()) == 1.0
    assert torch.equal(xa, b.train.tensors[0]) and not torch.equal(xa, c.train.tensors[0])
    counts = torch.bincount(a.test.tensors[1], minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified


def test_mnist1d_generated_offline_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITREPLAY_CACHE", str(tmp_path))

    def no_network(*a, **k):
        raise AssertionError("mnist1d loader tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    d = data.load("mnist1d")
    assert np.array_equal(np.random.get_state()[1], before)  # global RNG restored
    assert (d.num_classes, d.input_shape, len(d.train), len(d.test)) == (10, (1, 40), 4000, 1000)
    x, y = d.train.tensors
    assert x.shape == (4000, 1, 40) and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    cached = list(tmp_path.glob("mnist1d_*.npz"))
    assert len(cached) == 1
    again = data.load("mnist1d")  # from the cache file
    assert torch.equal(again.train.tensors[0], x) and torch.equal(again.test.tensors[1], d.test.tensors[1])


def test_unknown_dataset_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; known datasets: digits, mnist1d, cifar10"):
        data.load("svhn")
    for name, needle in [
        ("cifar10", "data_batch_1"),
        ("tinyimagenet", "wnids.txt"),
        ("imdb", "train/pos"),
        ("movielens", "ratings.dat"),
    ]:
        with pytest.raises(DatasetError, match=f"does not exist; expected .*{needle}"):
            data.load(name, data_dir=tmp_path / "absent")


# ------------------------------------------------------------------ CIFAR-10
def _cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    d = {
        b"batch_label": b"fixture",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }
    path.write_bytes(pickle.dumps(d, protocol=2))
    return d


def test_cifar10_fixture_loads(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [_cifar_batch(root / f"data_batch_{i}", 3, i) for i in range(1, 6)]
    test = _cifar_batch(root / "test_batch", 4, 99)
    d = data.load("cifar10", data_dir=tmp_path)
    assert (len(d.train), len(d.test), d.num_classes, d.input_shape) == (15, 4, 10, (3, 32, 32))
    x, y = d.test[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and int(y) == test[b"labels"][1]
    raw = test[b"data"][1].reshape(3, 32, 32)
    expected = (raw[0, 0, 0] / 255.0 - 0.4914) / 0.2470
    assert abs(float(x[0, 0, 0]) - expected) < 1e-5
    assert int(d.train[14][1]) == batches[4][b"labels"][2]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_restricted_unpickler_rejects_code(tmp_path):
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
        restricted_loads(pickle.dumps({b"data": _Evil()}, protocol=2))
    root = tmp_path / "c"
    root.mkdir()
    for i in range(1, 6):
        _cifar_batch(root / f"data_batch_{i}", 2, i)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(DatasetError, match=r"test_batch.*refusing"):
        data.load("cifar10", data_dir=root)


def test_cifar10_malformed_and_missing(tmp_path):
    for i in range(1, 6):
        _cifar_batch(tmp_path / f"data_batch_{i}", 2, i)
    with pytest.raises(DatasetError, match=r"files missing in .*: test_batch; expected CIFAR-10"):
        data.load("cifar10", data_dir=tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DatasetError, match=r"malformed: 'data' is uint8 \(2, 100\)"):
        data.load("cifar10", data_dir=tmp_path)
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a readable CIFAR-10 batch"):
        data.load("cifar10", data_dir=tmp_path)


# ------------------------------------------------------------- Tiny ImageNet
def _tiny_fixture(root):
    from PIL import Image

    wnids = ["n01443537", "n01629819"]
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (64, 64), (50 * k + j, 0, 0)).save(d / f"{w}_{j}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    Image.new("L", (64, 64), 128).save(root / "val" / "images" / "val_0.JPEG")  # grayscale -> RGB
    (root / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{wnids[1]}\t0\t0\t63\t63\n")
    return wnids


def test_tinyimagenet_fixture_loads(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    root.mkdir()
    wnids = _tiny_fixture(root)
    d = data.load("tinyimagenet", data_dir=tmp_path)
    assert (len(d.train), len(d.test), d.num_classes, d.input_shape) == (4, 1, 2, (3, 64, 64))
    assert d.meta["wnids"] == wnids
    x, y = d.test[0]
    assert x.shape == (3, 64, 64) and int(y) == 1
    assert abs(float(x[0, 5, 5]) - (128 / 255 - 0.485) / 0.229) < 0.02
    assert [int(d.train[i][1]) for i in range(4)] == [0, 0, 1, 1]


def test_tinyimagenet_malformed(tmp_path):
    _tiny_fixture(tmp_path)
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\n")
    with pytest.raises(DatasetError, match=r"val_annotations.txt:1: .*expected Tiny ImageNet"):
        data.load("tinyimagenet", data_dir=tmp_path)
    (tmp_path / "wnids.txt").unlink()
    with pytest.raises(DatasetError, match=r"wnids\.txt not found"):
        data.load("tinyimagenet", data_dir=tmp_path)


# ---------------------------------------------------------------------- IMDB
def test_tokenizer_and_vocab():
    assert tokenize("Great movie!<br /><br />I didn't LOVE it, 10/10.") == [
        "great",
        "movie",
        "i",
        "didn't",
        "love",
        "it",
        "10",
        "10",
    ]
    vocab = build_vocab([["b", "a", "a"], ["c", "b"]], vocab_size=4)
    assert vocab == {"a": 2, "b": 3}  # tie-free counts first; "c" dropped
    assert encode(["a", "c", "b"], vocab, 5) == [2, 1, 3, 0, 0]
    assert encode(["a"] * 9, vocab, 3) == [2, 2, 2]


def test_imdb_fixture_loads(tmp_path):
    root = tmp_path / "aclImdb"
    texts = {
        ("train", "pos"): ["good good film", "great film"],
        ("train", "neg"): ["bad film<br />awful"],
        ("test", "pos"): ["good unseenword"],
        ("test", "neg"): ["bad"],
    }
    for (split, lab), docs in texts.items():
        (root / split / lab).mkdir(parents=True)
        for i, t in enumerate(docs):
            (root / split / lab / f"{i}_7.txt").write_text(t, encoding="utf-8")
    d = data.load("imdb", data_dir=tmp_path, vocab_size=5, seq_len=4)
    assert d.input_shape == (4,) and d.input_dtype == torch.int64 and d.num_classes == 2
    assert d.meta["vocab"] == {"film": 2, "good": 3, "awful": 4}
    x, y = d.train.tensors
    assert x.tolist() == [[1, 2, 4, 0], [3, 3, 2, 0], [1, 2, 0, 0]]  # neg first, then pos (sorted)
    assert y.tolist() == [0, 1, 1]
    assert d.test.tensors[0].tolist() == [[1, 0, 0, 0], [3, 1, 0, 0]]


def test_imdb_missing_folder(tmp_path):
    (tmp_path / "train" / "pos").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train/neg not found; expected IMDB"):
        data.load("imdb", data_dir=tmp_path)


# ---------------------------------------------------------------- MovieLens
def test_movielens_fixture_history_labels_and_time_split(tmp_path):
    root = tmp_path / "ml-1m"
    root.mkdir()
    (root / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n3::Heat (1995)::Action|Crime\n",
        encoding="latin-1",
    )
    # user 1 rates 3 movies out of time order; user 2 one movie
    (root / "ratings.dat").write_text("1::3::5::300\n1::1::2::100\n1::2::4::200\n2::2::1::50\n", encoding="latin-1")
    d = data.load("movielens", data_dir=tmp_path, history=2, test_fraction=0.34)
    assert d.input_shape == (7,) and d.input_dtype == torch.int64 and d.num_classes == 1
    x, y = d.train.tensors
    # user 1 in time order: movie 1 (2 stars), movie 2 (4 stars) -> train; movie 3 (5 stars) -> test
    assert x.tolist() == [[1, 1, 3, 0, 0, 0, 0], [1, 2, 2, 0, 1, 0, 3], [2, 2, 2, 0, 0, 0, 0]]
    assert y.tolist() == [0.0, 1.0, 0.0]
    assert d.test.tensors[0].tolist() == [[1, 3, 1, 1, 2, 3, 2]]
    assert d.test.tensors[1].tolist() == [1.0]


def test_movielens_malformed(tmp_path):
    (tmp_path / "movies.dat").write_text("1::A::Drama\n")
    (tmp_path / "ratings.dat").write_text("1::1::9::5\n")
    with pytest.raises(DatasetError, match=r"ratings.dat:1: rating 9 outside 1..5; expected MovieLens-1M"):
        data.load("movielens", data_dir=tmp_path)
    (tmp_path / "ratings.dat").write_text("1::7::3::5\n")
    with pytest.raises(DatasetError, match=r"missing from movies.dat: \[7\]"):
        data.load("movielens", data_dir=tmp_path)
    (tmp_path / "ratings.dat").write_text("1,1,3,5\n")
    with pytest.raises(DatasetError, match="expected UserID::MovieID::Rating::Timestamp"):
        data.load("movielens", data_dir=tmp_path)
