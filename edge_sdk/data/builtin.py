"""Datasets that need no files and no network: scikit-learn's digits and MNIST-1D."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from edge_sdk.data.base import DatasetSplits, cache_dir


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """The 1,797 8x8 digit images bundled with scikit-learn, scaled to [0, 1],
    shape (1, 8, 8), with a stratified train/test split fixed by ``seed``."""
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DatasetSplits(
        name="digits",
        train=TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        test=TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te)),
        num_classes=10,
        input_shape=(1, 8, 8),
        meta={"source": "sklearn.datasets.load_digits", "scale": "x/16"},
    )


# MNIST-1D's canonical generation settings (Greydanus 2020): 5,000 samples,
# 80/20 split, seed 42. Changing them changes the dataset, so they are part of
# the cache file name.
MNIST1D_NUM_SAMPLES = 5000
MNIST1D_SEED = 42


def _generate_mnist1d(num_samples: int, gen_seed: int) -> dict[str, np.ndarray]:
    """Run mnist1d's procedural generator (``make_dataset``: no download; we never
    call ``get_dataset``, whose default downloads a pickle). The generator seeds
    numpy's and Python's global RNGs, so their state is saved and restored."""
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        args = get_dataset_args()
        args.num_samples = num_samples
        args.seed = gen_seed
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def load_mnist1d(seed: int = 0, num_samples: int = MNIST1D_NUM_SAMPLES, gen_seed: int = MNIST1D_SEED) -> DatasetSplits:
    """MNIST-1D (40-sample 1-D signals, 10 classes), shape (1, 40), generated
    offline and cached as ``.npz`` (no pickle) under :func:`cache_dir`.

    ``seed`` is accepted for a uniform signature but does not change the data:
    MNIST-1D has a canonical generation seed and split (4,000 / 1,000)."""
    del seed
    path = cache_dir() / f"mnist1d_n{num_samples}_s{gen_seed}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    else:
        arrays = _generate_mnist1d(num_samples, gen_seed)
        # atomic write: another process may be generating the same file
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **arrays)
        Path(tmp.name).replace(path)

    def to_ds(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x.astype(np.float32)).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))

    return DatasetSplits(
        name="mnist1d",
        train=to_ds(arrays["x"], arrays["y"]),
        test=to_ds(arrays["x_test"], arrays["y_test"]),
        num_classes=10,
        input_shape=(1, 40),
        meta={"source": "mnist1d.data.make_dataset", "num_samples": num_samples, "gen_seed": gen_seed, "cache": str(path)},
    )
