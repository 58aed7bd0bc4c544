"""Trace a prepared head to a TorchScript file with the same three methods.

TorchScript is the fallback where ExecuTorch is not available (for example a
Raspberry Pi image with only libtorch). All three methods take the parameters as
inputs, so the runtime owns the weights as ordinary leaf tensors:

* ``forward(x, *params, *buffers, *masks) -> (features, *new_buffers)``
* ``forward_eval(x, *params, *buffers) -> features``
* ``forward_backward(x, g, *params, *buffers, *masks) -> sum(head(x) * g)``; the
  runtime back-propagates this scalar with autograd (libtorch has autograd; the
  traced graph is differentiable), which gives the parameter gradients ``J^T g``.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from export.program import ForwardEval, ForwardLossFunctional, ForwardTrain, PreparedHead, example_inputs


class _Program(nn.Module):
    def __init__(self, prep: PreparedHead) -> None:
        super().__init__()
        self.fwd = ForwardTrain(prep)
        self.ev = ForwardEval(prep)
        self.fb = ForwardLossFunctional(prep)
        self._n_params = len(prep.params)

    def forward(self, *args: torch.Tensor):
        return self.fwd(*args)

    def forward_eval(self, *args: torch.Tensor):
        return self.ev(*args)

    def forward_backward(self, *args: torch.Tensor):
        return self.fb(*args)


def export_torchscript(prep: PreparedHead, path: str | os.PathLike) -> None:
    args = example_inputs(prep)
    x, g = args["forward_backward"][:2]
    fb_args = (x, g, *args["forward"][1:])  # x, g, params, buffers, masks
    prog = _Program(prep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace_module(
            prog,
            {"forward": args["forward"], "forward_eval": args["forward_eval"], "forward_backward": fb_args},
            check_trace=False,
        )
    traced.save(str(path))
