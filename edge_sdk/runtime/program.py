"""What every ahead-of-time head runtime shares: the manifest and the explicit state.

An exported head program (``python -m export``) takes as inputs what eager PyTorch
keeps implicitly: the parameters, BatchNorm running statistics and dropout masks.
This module holds that state on the Python side so the ExecuTorch and TorchScript
runtimes only differ in how they call the program.

Short last batch: programs have a fixed batch size ``B``. A smaller batch is
**padded** with zero rows (and zero upstream gradient rows, so padded rows add
nothing to any parameter gradient) and the features are sliced back. That is exact
unless the head normalises with *batch* statistics (train-mode BatchNorm), where
padding would change the statistics: there a short train-mode batch raises
:class:`ShortBatchError` and the caller must drop it (``drop_last=True``). Eval
forwards (running statistics) always pad.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edge_sdk.runtime.base import HeadRuntime

MANIFEST = "manifest.json"


class ShortBatchError(ValueError):
    """A train-mode batch smaller than the program's batch size on a BatchNorm head."""


class ManifestError(ValueError):
    """The programs directory does not hold a usable program for the request."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(programs_dir: str | Path) -> dict[str, Any]:
    path = Path(programs_dir) / MANIFEST
    if not path.exists():
        raise ManifestError(f"no {MANIFEST} in {programs_dir}; run `python -m export` first")
    return json.loads(path.read_text())


def point_entry(manifest: Mapping[str, Any], point: int) -> dict[str, Any]:
    entry = manifest.get("points", {}).get(str(point))
    if entry is None:
        have = ", ".join(sorted(manifest.get("points", {}), key=int)) or "none"
        raise ManifestError(f"no program for point {point} (exported points: {have})")
    return entry


@dataclass
class ProgramState:
    """Parameters, buffers and mask recipe of one head program, in program order."""

    entry: dict[str, Any]
    batch_size: int
    params: dict[str, torch.Tensor]  # full name -> live tensor
    buffers: dict[str, torch.Tensor]  # full name -> tensor (running stats + num_batches_tracked)

    @property
    def param_list(self) -> list[torch.Tensor]:
        return [self.params[p["name"]] for p in self.entry["parameters"]]

    @property
    def buffer_list(self) -> list[torch.Tensor]:
        return [self.buffers[b["name"]] for b in self.entry["buffers"]]

    @property
    def batchnorm_trains(self) -> bool:
        return bool(self.entry["batchnorms"]) and not self.entry.get("freeze_batchnorm", False)

    def draw_masks(self, n: int) -> list[torch.Tensor]:
        """Dropout masks for ``n`` real rows, drawn from torch's RNG like eager ``F.dropout``
        (so a restored RNG state reproduces them), padded with ones to the batch size."""
        masks = []
        for d in self.entry["dropouts"]:
            shape = [n, *d["shape"][1:]]
            keep = 1.0 - d["p"]
            m = torch.empty(shape).bernoulli_(keep).div_(keep)
            masks.append(self.pad(m, fill=1.0))
        return masks

    def pad(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        n = t.shape[0]
        if n > self.batch_size:
            raise ValueError(f"batch of {n} exceeds the program's batch size {self.batch_size}")
        t = t.detach().to(torch.float32).contiguous()
        if n == self.batch_size:
            return t
        extra = torch.full((self.batch_size - n, *t.shape[1:]), fill, dtype=t.dtype)
        return torch.cat([t, extra])

    def check_train_batch(self, n: int) -> None:
        if n != self.batch_size and self.batchnorm_trains:
            raise ShortBatchError(
                f"train-mode batch of {n} on a program with batch size {self.batch_size} and train-mode "
                "BatchNorm: padding would change the batch statistics; drop the short batch (drop_last=True)"
            )

    def update_buffers(self, new_values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for spec, value in zip(self.entry["buffers"], new_values):
                self.buffers[spec["name"]].copy_(value)
            for bn in self.entry["batchnorms"]:
                self.buffers[f"{bn['name']}.num_batches_tracked"].add_(1)


def init_buffers(entry: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Running statistics from ``weights`` (missing ones start at eager defaults)."""
    buffers: dict[str, torch.Tensor] = {}
    for spec in entry["buffers"]:
        name = spec["name"]
        if name in weights:
            buffers[name] = weights[name].detach().to(torch.float32).clone().contiguous()
        else:
            default = torch.ones if name.endswith("running_var") else torch.zeros
            buffers[name] = default(spec["shape"])
    for bn in entry["batchnorms"]:
        name = f"{bn['name']}.num_batches_tracked"
        buffers[name] = weights[name].detach().clone() if name in weights else torch.tensor(0, dtype=torch.long)
    return buffers


def check_weights(entry: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
    missing = [p["name"] for p in entry["parameters"] if p["name"] not in weights]
    if missing:
        raise ManifestError(f"weights lack head parameter(s): {', '.join(missing[:5])}")
    for p in entry["parameters"]:
        if list(weights[p["name"]].shape) != p["shape"]:
            raise ManifestError(f"{p['name']}: weights have shape {list(weights[p['name']].shape)}, program {p['shape']}")


class ProgramRuntime(HeadRuntime):
    """What the ExecuTorch and TorchScript runtimes share: opening a program from
    the manifest (format, weights and sha256 checked), the live weights in
    :class:`ProgramState`, and the forward protocol (pad, masks, running statistics
    returned as outputs). Subclasses load the program and call its methods."""

    format: str = ""

    def _open(
        self, programs_dir: str | Path, point: int, weights: Mapping[str, torch.Tensor], verify: bool
    ) -> tuple[dict[str, Any], Path]:
        self.programs_dir = Path(programs_dir)
        self.manifest = load_manifest(programs_dir)
        if self.manifest.get("format") != self.format:
            raise ManifestError(f"{programs_dir} holds {self.manifest.get('format')} programs, not {self.format}")
        entry = point_entry(self.manifest, point)
        check_weights(entry, weights)
        path = self.programs_dir / entry["file"]
        if verify and sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"{path} does not match the sha256 in the manifest")
        self.point = point
        self.batch_size = int(entry["batch_size"])
        return entry, path

    def _run(self, method: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.state.params)

    def named_buffers(self) -> dict[str, torch.Tensor]:
        return dict(self.state.buffers)

    def forward(self, x: torch.Tensor, *, train: bool = True) -> torch.Tensor:
        n = x.shape[0]
        xs = self.state.pad(x)
        with torch.no_grad():
            if not train:
                out = self._run("forward_eval", [xs, *self.state.param_list, *self.state.buffer_list])
                return out[0][:n].clone()
            self.state.check_train_batch(n)
            masks = self.state.draw_masks(n)
            out = self._run("forward", [xs, *self.state.param_list, *self.state.buffer_list, *masks])
        if not self.state.entry.get("freeze_batchnorm"):
            self.state.update_buffers(list(out[1:]))
        return out[0][:n].clone()
