"""Shared types for the dataset loaders: the splits container and the one error."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


class DatasetError(ValueError):
    """A dataset path is missing or malformed. The message names the expected
    layout, so the user can fix the files without reading the loader."""


@dataclass
class DatasetSplits:
    """Train and test splits of one dataset.

    ``train`` / ``test`` yield ``(x, y)`` tensor pairs; ``input_shape`` is the
    per-sample shape of ``x`` and ``input_dtype`` its dtype (int64 for token or id
    inputs). ``meta`` holds loader-specific facts (vocabulary, id ranges, ...).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype = torch.float32
    meta: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """Where generated data is cached: ``$SPLITREPLAY_CACHE`` or ``~/.cache/splitreplay``."""
    root = os.environ.get("SPLITREPLAY_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "splitreplay"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_data_dir(name: str) -> Path:
    """Default root for real datasets: ``$SPLITREPLAY_DATA/<name>`` or ``<cache>/data/<name>``."""
    root = os.environ.get("SPLITREPLAY_DATA")
    return (Path(root) if root else cache_dir() / "data") / name


class NormalizedImages(Dataset):
    """uint8 NCHW images kept compact in memory, normalized per channel on access.

    Why not a TensorDataset of floats: CIFAR-10 as float32 is 600 MB; as uint8
    it is 150 MB, and normalizing one sample at a time is cheap.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 NCHW tensor")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].to(torch.float32).div_(255.0)
        return (x - self.mean) / self.std, self.labels[i]
