"""Checkpoints on disk, for both sides: one folder per step, written atomically.

A checkpoint is a ``tensors.safetensors`` file (weights, buffers, optimizer
state, RNG states: anything that is a tensor) and a ``manifest.json`` (counters,
configuration, records), in a folder named for the step it belongs to. Both sides
keep the newest few: the device saves only after the cloud confirmed its own save
of the same step, so the device's newest is the cloud's newest or the one before,
and on a resume both roll back to the newest step both hold.

Why a folder renamed into place and not files overwritten: a process killed
mid-write (the case this exists for) must leave the previous checkpoint whole.
Each file is written to a temporary folder, flushed with fsync, and the folder is
renamed to its final name (atomic on POSIX) and the parent directory fsynced, so
after a crash a step folder is either complete or absent. Leftover temporary
folders are removed on the next open.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"
#: the format of what this module writes; a newer one is refused with a clear error
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or restored; the message is for the user."""


@dataclass(frozen=True)
class Saved:
    """What one save wrote: where, how many bytes, how long it took (fsyncs included)."""

    path: Path
    nbytes: int
    seconds: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class CheckpointStore:
    """The checkpoints of one session (or one device run) under ``root``."""

    def __init__(self, root: str | Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep at least one checkpoint")
        self.root = Path(root)
        self.keep = keep
        if self.root.is_dir():
            for tmp in self.root.glob(".tmp-*"):  # a save that was killed half-way
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _name(step: int) -> str:
        return f"step-{step:012d}"

    def path(self, step: int) -> Path:
        """The folder of ``step``'s checkpoint."""
        return self.root / self._name(step)

    def steps(self) -> list[int]:
        """The complete checkpoints here, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name.startswith("step-") and (entry / MANIFEST).is_file():
                try:
                    out.append(int(entry.name[5:]))
                except ValueError:
                    continue
        return sorted(out)

    def newest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Saved:
        """Write the checkpoint of ``step`` atomically, then drop every checkpoint
        after it (a future that a roll back abandoned) and all but the newest
        ``keep``. Files are private to the user (0600): they hold the session's
        resume token."""
        t0 = time.perf_counter()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the session's resume token
        tmp = self.root / f".tmp-{self._name(step)}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            # safetensors wants contiguous tensors that share no memory
            save_file({k: t.detach().contiguous().clone() for k, t in tensors.items()}, str(tmp / TENSORS))
            (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, **manifest}, indent=1))
            for name in (TENSORS, MANIFEST):
                os.chmod(tmp / name, 0o600)
                _fsync_file(tmp / name)
            _fsync_dir(tmp)
            final = self.root / self._name(step)
            if final.exists():  # the same step saved again (after a roll back): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        nbytes = sum(f.stat().st_size for f in final.iterdir())
        kept = [s for s in self.steps() if s <= step]
        for old in [s for s in self.steps() if s > step] + kept[: -self.keep]:
            shutil.rmtree(self.root / self._name(old), ignore_errors=True)
        return Saved(final, nbytes, time.perf_counter() - t0)

    def drop_after(self, step: int) -> None:
        """Delete the checkpoints after ``step``: both sides rolled back to it."""
        for later in self.steps():
            if later > step:
                shutil.rmtree(self.root / self._name(later), ignore_errors=True)

    def load(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and manifest of ``step``; `CheckpointError` if it is missing or unreadable."""
        path = self.root / self._name(step)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            tensors = load_file(str(path / TENSORS))
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint of step {step} in {self.root}") from None
        except (OSError, ValueError) as exc:  # safetensors raises its own errors as ValueError subclasses
            raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError: a damaged file
            raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r}; this build reads {FORMAT}")
        return tensors, manifest

    def remove(self) -> None:
        """Delete every checkpoint here (the run or session is over), and the folder
        if nothing else is in it: it may be a user's folder with other files."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.is_dir() and (entry.name.startswith("step-") or entry.name.startswith(".tmp-")):
                shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()


def split_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix + "/"``, with the prefix taken off."""
    cut = len(prefix) + 1
    return {k[cut:]: t for k, t in tensors.items() if k.startswith(prefix + "/")}


def flatten_optimizer_state(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{param: {key: t}}`` -> ``{"optim/param/key": t}`` (the step count as a tensor)."""
    out: dict[str, torch.Tensor] = {}
    for pname, entries in state.items():
        for key, value in entries.items():
            out[f"optim/{pname}/{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in split_state(tensors, "optim").items():
        pname, _, key = name.rpartition("/")
        out.setdefault(pname, {})[key] = t
    return out
