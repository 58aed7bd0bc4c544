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

import os
import secrets
from pathlib import Path

from cloud_backend.session import CloudSession, SessionConfig
from edge_sdk.checkpoints import CheckpointError, CheckpointStore

SECRET_BYTES = 32


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

    def restore(self, session_id: int, step: int, config: SessionConfig) -> CloudSession:
        """The session as it was at its checkpoint of ``step``.

        Raises `CheckpointError` with a message for the device when that step is not kept."""
        store = self.store(session_id)
        steps = store.steps()
        if step not in steps:
            held = ", ".join(map(str, steps)) or "none"
            raise CheckpointError(f"session {session_id} has no checkpoint of step {step} on this cloud (it holds: {held})")
        tensors, manifest = store.load(step)
        try:
            return CloudSession.restore(session_id, config, tensors, manifest)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint of session {session_id} at step {step} cannot be restored: {exc}") from None
