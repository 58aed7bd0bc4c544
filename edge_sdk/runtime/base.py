"""The interface every head runtime implements.

Why an interface: the feature-replay window (`edge_sdk.pipeline`) must not care
whether the head is an eager `nn.Module`, an ExecuTorch program or a TorchScript
program. It needs exactly four things from a runtime:

* a forward pass for upload (train mode; BatchNorm running statistics update once
  per step, here),
* a *replayed* forward + backward given the upstream feature gradient (running
  statistics untouched, parameter gradients written to ``.grad``),
* the live parameter tensors, so a standard ``torch.optim`` optimizer can step them
  in place (and so weights and optimizer state can migrate when the cut moves),
* an eval-mode forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

#: ``spec.loss``: (model output, labels) -> (mean loss, number correct)
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | int]]


class HeadRuntime(ABC):
    """Runs the device's head blocks ``[0, p)``."""

    #: short name shown in logs and JSON output ("eager", "executorch", "torchscript")
    name: str = "abstract"

    @abstractmethod
    def named_parameters(self) -> dict[str, torch.Tensor]:
        """Live parameter tensors (leaf tensors; in-place updates take effect).

        Names follow the full model's state-dict naming (``blocks.<i>.<...>``) so
        that moving the cut maps parameters one to one.
        """

    @abstractmethod
    def named_buffers(self) -> dict[str, torch.Tensor]:
        """Live buffers (BatchNorm running statistics), same naming as parameters."""

    @abstractmethod
    def forward(self, x: torch.Tensor, *, train: bool = True) -> torch.Tensor:
        """Head forward without an autograd graph.

        ``train=True`` is the step's first forward: dropout active, BatchNorm uses
        batch statistics and updates its running statistics. ``train=False`` is
        evaluation.
        """

    @abstractmethod
    def replay_backward(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Recompute the train-mode forward on ``x`` with the current weights and
        back-propagate ``grad`` (d loss / d features).

        Writes (overwrites) ``.grad`` of every tensor in :meth:`named_parameters`.
        Must not update BatchNorm running statistics: they were updated by the
        step's first forward. The caller restores the RNG state for dropout.
        """

    def train_step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[float, int]:
        """Device-only training: forward the whole model, take the loss here and
        write every parameter's ``.grad``; returns (loss, correct).

        This generic version reuses the two calls every runtime has (a train
        forward, then a replayed backward of d loss / d output), so it costs one
        extra forward; runtimes that keep the graph override it.
        """
        rng_state = torch.get_rng_state()  # the replay must draw the same dropout masks
        out = self.forward(x, train=True).detach().requires_grad_(True)
        with torch.enable_grad():
            loss, correct = loss_fn(out, y)
            (grad,) = torch.autograd.grad(loss, out)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(rng_state)
            self.replay_backward(x, grad)
        return float(loss.detach()), int(correct)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.named_parameters().values())
