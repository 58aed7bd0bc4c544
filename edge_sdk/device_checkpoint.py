"""The device's half of a checkpoint: what it holds at an agreed, drained step.

Taken right after the cloud confirmed its own save of the same step
(`edge_sdk.session.EdgeSession._checkpoint`), with nothing in flight, so the
replay window is empty and the head, its optimizer and the RNG are all there is
to keep, with the position in the data (epoch, batch) and the run's records. The
session always keeps the newest in memory (a cloud that restarts rolls both sides
back to it); with ``--checkpoint-dir`` it is also written to disk
(`edge_sdk.checkpoints.CheckpointStore`), so ``--resume`` can carry on after
the device process itself died.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from edge_sdk.checkpoints import CheckpointError, CheckpointStore, flatten_optimizer_state, split_state
from edge_sdk.training import TrainConfig

#: ``TrainConfig`` fields never written to disk: the server's shared secret (given again on --resume)
SECRET_FIELDS = ("token",)
#: what ``--resume`` takes from its own command line rather than from the checkpoint
RESUME_OVERRIDES = ("token", "tls_ca", "reconnect_timeout_s", "checkpoint_dir", "resume")


@dataclass
class DeviceCheckpoint:
    """One agreed checkpoint: ``step`` is the next step id (every earlier one is
    applied on both sides); ``epoch`` and ``batch`` the next batch to train."""

    step: int
    epoch: int
    batch: int
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]

    @classmethod
    def capture(
        cls,
        *,
        step: int,
        epoch: int,
        batch: int,
        head: dict[str, torch.Tensor],
        optimizer_state: dict[str, dict[str, torch.Tensor]],
        manifest: dict[str, Any],
    ) -> DeviceCheckpoint:
        """Copies of the head tensors (by full model name), its optimizer state and
        torch's RNG, so training on after this does not change the checkpoint."""
        tensors = {f"head/{n}": t.detach().clone() for n, t in head.items()}
        tensors |= {k: t.detach().clone() for k, t in flatten_optimizer_state(optimizer_state).items()}
        tensors["rng"] = torch.get_rng_state()
        return cls(step, epoch, batch, tensors, dict(manifest, step=step, epoch=epoch, batch=batch))

    @property
    def head(self) -> dict[str, torch.Tensor]:
        return split_state(self.tensors, "head")

    def save(self, store: CheckpointStore) -> tuple[int, float]:
        """Write it (atomically); returns (bytes, seconds)."""
        saved = store.save(self.step, self.tensors, self.manifest)
        return saved.nbytes, saved.seconds

    def config(self, **given: Any) -> TrainConfig:
        """The run's configuration as it was saved, with ``given`` on top (what
        ``--resume`` takes from the command line: the connection and the folder)."""
        saved = {k: v for k, v in self.manifest["config"].items() if k in {f.name for f in fields(TrainConfig)}}
        return TrainConfig(**{**saved, **given})

    @classmethod
    def load(cls, directory: str | Path) -> DeviceCheckpoint:
        """The newest checkpoint in ``directory``; `CheckpointError` (for the user) if none."""
        store = CheckpointStore(directory, keep=1)
        step = store.newest()
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory} to resume from (was the run started with --checkpoint-dir?)")
        tensors, manifest = store.load(step)
        for key in ("session", "resume_token", "config", "epoch", "batch", "point", "codec", "staleness"):
            if key not in manifest:
                raise CheckpointError(f"checkpoint {directory} lacks {key!r}: not a device checkpoint")
        return cls(step, int(manifest["epoch"]), int(manifest["batch"]), tensors, manifest)
