"""Run the head through an exported ExecuTorch program (``python -m export``).

The program has three methods (see ``export/executorch_export.py``); the joint
``forward_backward`` method owns the weights as mutable tensors and
:class:`executorch.extension.training.TrainingModule` hands them out without a copy.
Those very tensors are this runtime's :meth:`named_parameters`: a ``torch.optim``
optimizer steps them in place, and the forward methods receive them as inputs, so
there is one copy of the weights. Short batches: see :mod:`edge_sdk.runtime.program`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from edge_sdk.quiet import native_stderr_captured
from edge_sdk.runtime.program import ProgramRuntime, ProgramState, init_buffers


def _training_module(data: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental API" warnings on every call
        from executorch.extension.training import _load_for_executorch_for_training_from_buffer

        return _load_for_executorch_for_training_from_buffer(data)


class ExecuTorchRuntime(ProgramRuntime):
    """Head blocks ``[0, p)`` as an ExecuTorch program, trained in place."""

    name = "executorch"
    format = "executorch"

    def __init__(self, programs_dir: str | Path, point: int, weights: Mapping[str, torch.Tensor], *, verify: bool = True) -> None:
        entry, path = self._open(programs_dir, point, weights, verify)
        # The runtime reads the program in place: these bytes must outlive the module.
        self._program_bytes = path.read_bytes()
        local_to_full = {p["local"]: p["name"] for p in entry["parameters"]}
        buffers = init_buffers(entry, weights)
        # The joint method's weights only become visible after one call.
        self.state = ProgramState(entry, self.batch_size, {}, buffers)
        with native_stderr_captured():  # the runtime probes the CPU on its first load and run
            self._module = _training_module(self._program_bytes)
            self._run_joint(
                torch.zeros(entry["input"]["shape"]),
                torch.zeros(entry["features"]["shape"]),
                self.state.draw_masks(self.batch_size),
            )
        self._method = self._module.model
        program_params = self._module.named_parameters()
        params = {}
        with torch.no_grad():
            for fqn, tensor in program_params.items():
                full = local_to_full[fqn.removeprefix("head.")]
                tensor.copy_(weights[full].to(tensor.dtype))
                params[full] = tensor
        self.state.params = {p["name"]: params[p["name"]] for p in entry["parameters"]}

    def _run_joint(self, x: torch.Tensor, g: torch.Tensor, masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self._module.forward_backward("forward_backward", [x, g, *self.state.buffer_list, *masks])
        return self._module.named_gradients()

    def _run(self, method: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self._method.run_method(method, args))

    def replay_backward(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        n = x.shape[0]
        self.state.check_train_batch(n)
        masks = self.state.draw_masks(n)
        grads = self._run_joint(self.state.pad(x), self.state.pad(grad), masks)
        local_to_full = {p["local"]: p["name"] for p in self.state.entry["parameters"]}
        for fqn, g in grads.items():
            self.state.params[local_to_full[fqn.removeprefix("head.")]].grad = g
