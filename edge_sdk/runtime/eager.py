"""Eager PyTorch head runtime (the reference, and the default on a Raspberry Pi)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from edge_sdk.runtime.base import HeadRuntime, LossFn


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Run train-mode forwards without changing BatchNorm running statistics.

    Replay recomputes a step's forward; if the running statistics moved again,
    a step replayed K steps later would count twice. Saving and restoring the
    buffers is exact (momentum=0 would still bump ``num_batches_tracked``).
    """
    saved = [
        (buf, buf.detach().clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in m.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class EagerRuntime(HeadRuntime):
    """Runs the head as an ordinary ``nn.Module``.

    ``prefix`` maps the module's own parameter names to the full model's names
    (the head of a :class:`~edge_sdk.blocks.BlockModel` is ``blocks[0:p]``, whose
    local names ``0.weight`` become ``blocks.0.weight``).
    """

    name = "eager"

    def __init__(self, module: nn.Module, *, name_map: dict[str, str] | None = None) -> None:
        self.module = module
        self._name_map = name_map or {}

    def _rename(self, items: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {self._name_map.get(k, k): v for k, v in items}

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return self._rename(self.module.named_parameters())

    def named_buffers(self) -> dict[str, torch.Tensor]:
        return self._rename(self.module.named_buffers())

    def forward(self, x: torch.Tensor, *, train: bool = True) -> torch.Tensor:
        self.module.train(train)
        with torch.no_grad():
            return self.module(x)

    def replay_backward(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        self.module.train(True)
        for p in self.module.parameters():
            p.grad = None
        # The backward stays inside: batch_norm's autograd node holds the running
        # statistics tensors, which must not change under it.
        with frozen_batchnorm_stats(self.module):
            out = self.module(x)
            out.backward(grad)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[float, int]:
        """One forward with its graph, the loss, one backward: what training alone costs."""
        self.module.train(True)
        for p in self.module.parameters():
            p.grad = None
        loss, correct = loss_fn(self.module(x), y)
        loss.backward()
        return float(loss.detach()), int(correct)
