"""Run the head through an exported TorchScript program (the ExecuTorch fallback).

The program's methods take the parameters as inputs, so this runtime owns them as
ordinary leaf tensors (``requires_grad=True``) and back-propagates the traced
``forward_backward`` scalar ``sum(head(x) * g)`` with autograd. Short batches: see
:mod:`edge_sdk.runtime.program`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from edge_sdk.runtime.base import HeadRuntime
from edge_sdk.runtime.program import (
    ManifestError,
    ProgramState,
    check_weights,
    init_buffers,
    load_manifest,
    point_entry,
    sha256_file,
)


class TorchScriptRuntime(HeadRuntime):
    """Head blocks ``[0, p)`` as a traced TorchScript program."""

    name = "torchscript"

    def __init__(self, programs_dir: str | Path, point: int, weights: Mapping[str, torch.Tensor], *, verify: bool = True) -> None:
        self.programs_dir = Path(programs_dir)
        self.manifest = load_manifest(programs_dir)
        if self.manifest.get("format") != "torchscript":
            raise ManifestError(f"{programs_dir} holds {self.manifest.get('format')} programs, not torchscript")
        entry = point_entry(self.manifest, point)
        check_weights(entry, weights)
        path = self.programs_dir / entry["file"]
        if verify and sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"{path} does not match the sha256 in the manifest")
        self.point = point
        self.batch_size = int(entry["batch_size"])
        self.program = torch.jit.load(str(path))
        params = {
            p["name"]: weights[p["name"]].detach().to(torch.float32).clone().contiguous().requires_grad_(True)
            for p in entry["parameters"]
        }
        self.state = ProgramState(entry, self.batch_size, params, init_buffers(entry, weights))

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.state.params)

    def named_buffers(self) -> dict[str, torch.Tensor]:
        return dict(self.state.buffers)

    def forward(self, x: torch.Tensor, *, train: bool = True) -> torch.Tensor:
        n = x.shape[0]
        xs = self.state.pad(x)
        with torch.no_grad():
            if not train:
                out = self.program.forward_eval(xs, *self.state.param_list, *self.state.buffer_list)
                return out[:n].clone()
            self.state.check_train_batch(n)
            masks = self.state.draw_masks(n)
            out = self.program.forward(xs, *self.state.param_list, *self.state.buffer_list, *masks)
        if not self.state.entry.get("freeze_batchnorm"):
            self.state.update_buffers(list(out[1:]))
        return out[0][:n].clone()

    def replay_backward(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        n = x.shape[0]
        self.state.check_train_batch(n)
        masks = self.state.draw_masks(n)
        params = self.state.param_list
        loss = self.program.forward_backward(self.state.pad(x), self.state.pad(grad), *params, *self.state.buffer_list, *masks)
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
