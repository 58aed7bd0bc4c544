"""Pick and load a program-backed head runtime by name."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from edge_sdk.runtime.base import HeadRuntime

PROGRAM_RUNTIMES = ("executorch", "torchscript")


def load_runtime(kind: str, programs_dir: str | Path, point: int, weights: Mapping[str, torch.Tensor]) -> HeadRuntime:
    """Load the ``kind`` program for ``point`` from ``programs_dir``, weights from ``weights``.

    ``weights`` maps full-model names (``blocks.<i>...``) to tensors, e.g. the full
    model's ``state_dict()``; only the head's entries are read. Eager PyTorch needs
    the module itself: build :class:`~edge_sdk.runtime.eager.EagerRuntime` directly.
    """
    if kind == "executorch":
        from edge_sdk.runtime.executorch_runtime import ExecuTorchRuntime

        return ExecuTorchRuntime(programs_dir, point, weights)
    if kind == "torchscript":
        from edge_sdk.runtime.torchscript_runtime import TorchScriptRuntime

        return TorchScriptRuntime(programs_dir, point, weights)
    raise ValueError(f"unknown program runtime {kind!r} (choose from {', '.join(PROGRAM_RUNTIMES)}; eager: use EagerRuntime)")
