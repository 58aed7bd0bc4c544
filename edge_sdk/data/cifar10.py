"""CIFAR-10 from the "python version" pickle batches, read without trusting pickle.

Why a restricted unpickler: a pickle can run arbitrary code on load. The CIFAR
batches only need plain containers, bytes/str, and numpy arrays, so
:class:`RestrictedUnpickler` admits exactly the numpy reconstruction helpers and
refuses every other global (``os.system``, ``builtins.eval``, ...).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_sdk.data.base import DatasetError, DatasetSplits, NormalizedImages

LAYOUT = (
    "expected CIFAR-10 'python version' batches: <data_dir>/cifar-10-batches-py/ (or <data_dir> itself) "
    "containing data_batch_1 .. data_batch_5 and test_batch, each a pickled dict with 'data' "
    "(N x 3072 uint8) and 'labels' (N ints in 0..9)"
)

# (module, name) pairs a CIFAR batch may reference; numpy moved multiarray to
# numpy._core in 2.0, so both spellings are allowed.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Python 3 pickles (protocol <= 2) of bytes objects call _codecs.encode(str, 'latin1')
    ("_codecs", "encode"),
}

# Per-channel statistics of the CIFAR-10 training set (widely used values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class UnsafePickleError(DatasetError):
    """The pickle references a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to unpickle global {module}.{name}: only plain containers, bytes and numpy arrays are allowed"
        )


def restricted_loads(data: bytes) -> Any:
    """``pickle.loads`` admitting only plain containers, bytes/str and numpy arrays.
    ``encoding='bytes'`` reads the original Python 2 batches."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _key(d: dict, name: str) -> Any:
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    raise KeyError(name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (N, 3, 32, 32) uint8 images and (N,) int64 labels."""
    try:
        obj = restricted_loads(path.read_bytes())
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except Exception as exc:
        raise DatasetError(f"{path} is not a readable CIFAR-10 batch ({exc}); {LAYOUT}") from exc
    try:
        if not isinstance(obj, dict):
            raise TypeError(f"top level is {type(obj).__name__}, not dict")
        data = np.asarray(_key(obj, "data"))
        labels = np.asarray(_key(obj, "labels"), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise TypeError(f"'data' is {data.dtype} {data.shape}, want uint8 (N, 3072)")
        if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
            raise TypeError(f"'labels' has shape {labels.shape} / values outside 0..9")
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path} is malformed: {exc}; {LAYOUT}") from None
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: Path) -> DatasetSplits:
    root = data_dir / "cifar-10-batches-py" if (data_dir / "cifar-10-batches-py").is_dir() else data_dir
    train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
    test_file = root / "test_batch"
    missing = [p.name for p in [*train_files, test_file] if not p.is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 files missing in {root}: {', '.join(missing)}; {LAYOUT}")
    parts = [read_batch(p) for p in train_files]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = read_batch(test_file)
    return DatasetSplits(
        name="cifar10",
        train=NormalizedImages(torch.from_numpy(x_tr), torch.from_numpy(y_tr), CIFAR10_MEAN, CIFAR10_STD),
        test=NormalizedImages(torch.from_numpy(x_te), torch.from_numpy(y_te), CIFAR10_MEAN, CIFAR10_STD),
        num_classes=10,
        input_shape=(3, 32, 32),
        meta={"root": str(root)},
    )
