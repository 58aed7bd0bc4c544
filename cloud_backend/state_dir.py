"""``serve --state-dir DIR``: what a server keeps on disk so that its sessions
survive a restart (SIGKILL included).

* ``DIR/secret``: the key resume tokens are HMACs under. It must outlive the
  process, or no device could prove after a restart that a session is its own.
  Created once with mode 0600.
* ``DIR/sessions/session-<id>/step-<s>/``: the newest two checkpoints of each
  session (`edge_sdk.checkpoints.CheckpointStore`: safetensors + JSON manifest,
  written atomically). Two, because the device saves only after the cloud
  confirmed: its newest is the cloud's newest or the one before.

A session's folder is deleted when the session ends (a goodbye, an error, its TTL
expired), so the directory holds only sessions a device may still resume.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch

from cloud_backend.session import CloudSession, SessionConfig, resume_token
from edge_sdk.checkpoints import MANIFEST, CheckpointError, CheckpointStore, Saved

SECRET_BYTES = 32


class WrongResumeToken(CheckpointError):
    """The resume token does not belong to the session on disk."""


class StateDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            (self.root / "sessions").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--state-dir {root}: cannot create it: {exc}") from None

    def secret(self) -> bytes:
        """The server's resume-token key: read, or made once and kept."""
        path = self.root / "secret"
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            key = b""
        if len(key) == SECRET_BYTES:
            return key
        key = secrets.token_bytes(SECRET_BYTES)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        return key

    def store(self, session_id: int) -> CheckpointStore:
        return CheckpointStore(self.root / "sessions" / f"session-{session_id}", keep=2)

    def session_ids(self) -> list[int]:
        """Sessions with at least one complete checkpoint."""
        out = []
        for entry in (self.root / "sessions").iterdir():
            if entry.is_dir() and entry.name.startswith("session-"):
                try:
                    sid = int(entry.name[8:])
                except ValueError:
                    continue
                if self.store(sid).steps():
                    out.append(sid)
        return sorted(out)

    def remove(self, session_id: int) -> None:
        self.store(session_id).remove()

    def save(self, session_id: int, step: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Saved:
        return self.store(session_id).save(step, tensors, manifest)

    def restore(self, session_id: int, step: int, config: SessionConfig, token: str) -> CloudSession:
        """The session as it was at its checkpoint of ``step``, for a device that
        presents its resume ``token``; the checkpoints after ``step`` are dropped
        (both sides roll back to it).

        The token is checked (constant time) before anything is loaded or said
        about the session. Raises `WrongResumeToken`, or `CheckpointError` with a
        message for the device when that step is not kept or does not load."""
        store = self.store(session_id)
        steps = store.steps()
        nonce = None
        if steps:
            try:
                nonce = json.loads((store.path(steps[-1]) / MANIFEST).read_text()).get("nonce")
            except (OSError, ValueError):
                nonce = None
        expected = resume_token(config.resume_secret, session_id, str(nonce)) if nonce else ""
        if not expected or not hmac.compare_digest(token.encode("utf-8"), expected.encode("utf-8")):
            raise WrongResumeToken(f"session {session_id} is unknown or expired, or the resume token is wrong")
        if step not in steps:
            held = ", ".join(map(str, steps))
            raise CheckpointError(f"session {session_id} has no checkpoint of step {step} on this cloud (it holds: {held})")
        tensors, manifest = store.load(step)
        try:
            session = CloudSession.restore(session_id, config, tensors, manifest)
        except Exception as exc:  # noqa: BLE001 - whatever a damaged or foreign checkpoint breaks: one line
            raise CheckpointError(
                f"the checkpoint of session {session_id} at step {step} cannot be restored: {type(exc).__name__}: {exc}"
            ) from None
        store.drop_after(step)
        return session
