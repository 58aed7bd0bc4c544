"""Datasets: ``load(name, data_dir=None, seed=0, **options) -> DatasetSplits``.

``digits`` and ``mnist1d`` need no files and no network. The others read local
files in their published layouts (no download at run time); a missing or
malformed path raises :class:`DatasetError` naming the expected layout.
Default ``data_dir``: ``$SPLITREPLAY_DATA/<name>`` or ``~/.cache/splitreplay/data/<name>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_sdk.data.base import DatasetError, DatasetSplits, cache_dir, default_data_dir

__all__ = ["DatasetError", "DatasetSplits", "cache_dir", "load", "names"]

_BUILTIN = ("digits", "mnist1d")
_FILES = ("cifar10", "tinyimagenet", "imdb", "movielens")


def names() -> list[str]:
    return [*_BUILTIN, *_FILES]


def load(name: str, data_dir: str | Path | None = None, seed: int = 0, **options: Any) -> DatasetSplits:
    """Load dataset ``name``. ``seed`` fixes the train/test split where the
    dataset has no canonical one (digits). ``options`` go to the loader
    (imdb: vocab_size, seq_len; movielens: history, test_fraction;
    tinyimagenet: image_size; mnist1d: num_samples)."""
    if name == "digits":
        from edge_sdk.data.builtin import load_digits

        return load_digits(seed=seed, **options)
    if name == "mnist1d":
        from edge_sdk.data.builtin import load_mnist1d

        return load_mnist1d(seed=seed, **options)
    if name not in _FILES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(names())}")
    root = Path(data_dir) if data_dir is not None else default_data_dir(name)
    if not root.is_dir():
        from importlib import import_module

        layout = import_module(f"edge_sdk.data.{name}").LAYOUT
        raise DatasetError(f"{name}: data directory {root} does not exist; {layout}")
    if name == "cifar10":
        from edge_sdk.data.cifar10 import load_cifar10

        return load_cifar10(root, **options)
    if name == "tinyimagenet":
        from edge_sdk.data.tinyimagenet import load_tinyimagenet

        return load_tinyimagenet(root, **options)
    if name == "imdb":
        from edge_sdk.data.imdb import load_imdb

        return load_imdb(root, **options)
    from edge_sdk.data.movielens import load_movielens

    return load_movielens(root, **options)
