"""What a valid training target looks like for each zoo loss.

The cloud computes the loss from labels a peer sent, so it must know, before it
runs anything, what shape, dtype and value range a target may have: a class id
outside ``[0, num_classes)`` makes ``cross_entropy`` raise deep inside torch, and
a NaN target poisons the tail's weights. `TargetSpec.check_claim` looks only at
what a frame claims (no allocation); `TargetSpec.check_values` looks at the
decoded values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TargetKind = Literal["class", "binary", "dense"]


@dataclass(frozen=True)
class TargetSpec:
    """Per-sample target of a model's loss.

    * ``class``: one integer class id per sample, in ``[0, num_classes)``;
    * ``binary``: one number in ``[0, 1]`` per sample (shape ``(B,)`` or ``(B, 1)``);
    * ``dense``: a float tensor of ``shape`` per sample, finite.
    """

    kind: TargetKind
    shape: tuple[int, ...] = ()
    num_classes: int = 0

    def check_claim(self, shape: tuple[int, ...], is_float: bool, batch: int) -> str | None:
        """Why a target tensor of this (claimed) shape and dtype is not acceptable, or None."""
        if not shape or shape[0] != batch:
            return f"labels of shape {shape} for a batch of {batch}"
        rest = tuple(shape[1:])
        if self.kind == "class":
            if rest != () or is_float:
                return f"class labels must be one integer per sample, got shape {shape} ({'float' if is_float else 'integer'})"
        elif self.kind == "binary":
            if rest not in ((), (1,)):
                return f"binary targets must be one number per sample, got shape {shape}"
        elif rest != self.shape or not is_float:
            return f"targets must be float tensors of shape (B, {', '.join(map(str, self.shape))}), got {shape}"
        return None

    def prepare(self, target: torch.Tensor) -> torch.Tensor:
        """The target in the dtype the loss computes with (class ids as int64, the rest float32).

        Any integer dtype may carry class ids on the wire; ``cross_entropy`` takes int64 only."""
        return target.long() if self.kind == "class" else target.float()

    def check_values(self, target: torch.Tensor) -> str | None:
        """Why these decoded targets are not acceptable, or None."""
        if target.numel() == 0:
            return None
        if self.kind == "class":
            lo, hi = int(target.min()), int(target.max())
            if lo < 0 or hi >= self.num_classes:
                return f"class labels must be in [0, {self.num_classes}), got values in [{lo}, {hi}]"
            return None
        t = target.float()
        if not bool(torch.isfinite(t).all()):
            return "targets contain NaN or Inf"
        if self.kind == "binary" and (float(t.min()) < 0 or float(t.max()) > 1):
            return "binary targets must be in [0, 1]"
        return None
