"""Run the head through an exported TorchScript program (the ExecuTorch fallback).

The program's methods take the parameters as inputs, so this runtime owns them as
ordinary leaf tensors (``requires_grad=True``) and back-propagates the traced
``forward_backward`` scalar ``sum(head(x) * g)`` with autograd. Short batches: see
:mod:`edge_sdk.runtime.program`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from edge_sdk.runtime.program import ProgramRuntime, ProgramState, init_buffers


class TorchScriptRuntime(ProgramRuntime):
    """Head blocks ``[0, p)`` as a traced TorchScript program."""

    name = "torchscript"
    format = "torchscript"

    def __init__(self, programs_dir: str | Path, point: int, weights: Mapping[str, torch.Tensor], *, verify: bool = True) -> None:
        entry, path = self._open(programs_dir, point, weights, verify)
        self.program = torch.jit.load(str(path))
        params = {
            p["name"]: weights[p["name"]].detach().to(torch.float32).clone().contiguous().requires_grad_(True)
            for p in entry["parameters"]
        }
        self.state = ProgramState(entry, self.batch_size, params, init_buffers(entry, weights))

    def _run(self, method: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
        out = getattr(self.program, method)(*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def replay_backward(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        n = x.shape[0]
        self.state.check_train_batch(n)
        masks = self.state.draw_masks(n)
        params = self.state.param_list
        loss = self.program.forward_backward(self.state.pad(x), self.state.pad(grad), *params, *self.state.buffer_list, *masks)
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
