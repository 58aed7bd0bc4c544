"""Centralized training recipes and the reference (unsplit) training loop.

Why here and not only in the benchmark: split training is judged against
centralized training *with the same recipe*, so the recipe is code the pipeline
can import (``RECIPES["digits_cnn"]``), not just numbers in a JSON file.
The recipes use a constant learning rate (no schedule to keep in sync across the
cut) and plain SGD with momentum, which the head and tail optimizers reproduce
exactly when split (SGD is per-parameter).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from edge_sdk.data import DatasetSplits
from edge_sdk.zoo import ModelSpec


@dataclass(frozen=True)
class Recipe:
    dataset: str
    epochs: int
    batch_size: int
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0  # model init and shuffling
    shuffle: bool = True
    drop_last: bool = False
    #: test accuracy that counts as "trained" for time-to-accuracy comparisons
    #: (``bench/decision.py``); below what the recipe reaches centralized
    target_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer!r}; use 'sgd' or 'adam'")

    def train_loader(self, splits: DatasetSplits) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(splits.train, batch_size=self.batch_size, shuffle=self.shuffle, generator=g, drop_last=self.drop_last)


#: per zoo model, the recipe of the dataset it is meant for. The bundled-data
#: recipes (digits, mnist1d) are the measured ones; the others are common
#: starting points for the paper's task shapes (their data is not bundled).
RECIPES: dict[str, Recipe] = {
    "digits_cnn": Recipe(dataset="digits", epochs=20, batch_size=32, optimizer="sgd", lr=0.05, target_accuracy=0.95),
    "mnist1d_cnn": Recipe(dataset="mnist1d", epochs=30, batch_size=32, optimizer="sgd", lr=0.05),
    "resnet50": Recipe(dataset="cifar10", epochs=30, batch_size=64, optimizer="sgd", lr=0.05),
    "resnet50_imagenet": Recipe(dataset="tinyimagenet", epochs=30, batch_size=64, optimizer="sgd", lr=0.05),
    "bilstm": Recipe(dataset="imdb", epochs=5, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0),
    "din": Recipe(dataset="movielens", epochs=5, batch_size=256, optimizer="adam", lr=1e-3, weight_decay=0.0),
}


def recipe_for_dataset(dataset: str) -> tuple[str, Recipe]:
    """(zoo model, recipe) that trains ``dataset``; one clear error if none does."""
    for model, recipe in RECIPES.items():
        if recipe.dataset == dataset:
            return model, recipe
    known = ", ".join(r.dataset for r in RECIPES.values())
    raise ValueError(f"no recipe for dataset {dataset!r} (recipes exist for {known}); pass --model")


@dataclass
class TrainResult:
    final_test_accuracy: float
    final_test_loss: float
    epoch_test_accuracy: list[float] = field(default_factory=list)
    epoch_train_loss: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


@torch.no_grad()
def evaluate(spec: ModelSpec, dataset, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean loss) of ``spec.model`` in eval mode over ``dataset``."""
    spec.model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        loss, c = spec.loss(spec.model(x), y)
        total += len(y)
        correct += c
        loss_sum += float(loss.detach()) * len(y)
    return correct / max(total, 1), loss_sum / max(total, 1)


def train_centralized(spec: ModelSpec, splits: DatasetSplits, recipe: Recipe, epochs: int | None = None) -> TrainResult:
    """Train the whole model in one process (no split): the reference run."""
    torch.manual_seed(recipe.seed)
    opt = recipe.make_optimizer(spec.model.parameters())
    loader = recipe.train_loader(splits)
    res = TrainResult(0.0, 0.0)
    t0 = time.perf_counter()
    for _ in range(recipe.epochs if epochs is None else epochs):
        spec.model.train()
        loss_sum, n = 0.0, 0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss, _ = spec.loss(spec.model(x), y)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            n += len(y)
            res.steps += 1
        res.epoch_train_loss.append(loss_sum / max(n, 1))
        acc, _ = evaluate(spec, splits.test)
        res.epoch_test_accuracy.append(acc)
    res.seconds = time.perf_counter() - t0
    res.final_test_accuracy, res.final_test_loss = evaluate(spec, splits.test)
    return res
