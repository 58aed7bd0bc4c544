"""The server's memory shared by its sessions (``serve --max-memory``).

Each session reserves its estimated need (`ModelPlan.memory_bytes`: tail weights,
optimizer state, reply cache, one step's activations, weights on their way in)
whenever it checks its own per-session limit: at ``Hello``, for each chunk of
weights coming up, and before a repartition. A reservation *replaces* the
session's previous one, so a session that moves its cut holds what the new cut
needs. The check and the update are one step under a lock: sessions compute in
worker threads, and two Hellos must not both take the last free megabytes.

Pure accounting, no I/O: `CloudSession` calls it, the server releases a
session's reservation when the session ends.
"""

from __future__ import annotations

import threading

from schemas.errors import ErrorCode, WireError


class MemoryBudget:
    def __init__(self, total_bytes: int) -> None:
        if total_bytes <= 0:
            raise ValueError(f"the memory budget must be positive, got {total_bytes} bytes")
        self.total_bytes = int(total_bytes)
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()

    def reserve(self, session_id: int, nbytes: int) -> None:
        """Hold ``nbytes`` for ``session_id`` (instead of what it held), or raise
        `WireError`: ``LIMIT_EXCEEDED`` if it would never fit, ``SERVER_BUSY`` if
        other sessions hold the rest."""
        mib = 2**20
        if nbytes > self.total_bytes:
            raise WireError(
                ErrorCode.LIMIT_EXCEEDED,
                f"this session would need about {nbytes / mib:.0f} MiB; the whole server has {self.total_bytes / mib:.0f} MiB",
            )
        with self._lock:
            others = sum(v for k, v in self._held.items() if k != session_id)
            if others + nbytes > self.total_bytes:
                raise WireError(
                    ErrorCode.SERVER_BUSY,
                    f"server memory is taken: this session would need about {nbytes / mib:.0f} MiB, "
                    f"{(self.total_bytes - others) / mib:.0f} of {self.total_bytes / mib:.0f} MiB are free "
                    f"({len(self._held) - (session_id in self._held)} other sessions hold the rest); try again later",
                )
            self._held[session_id] = int(nbytes)

    def hold(self, session_id: int, nbytes: int) -> None:
        """Set ``session_id``'s reservation without a check: what a session already
        holds (its cut after a move that was checked, or a refused move undone)."""
        with self._lock:
            self._held[session_id] = int(nbytes)

    def release(self, session_id: int) -> None:
        with self._lock:
            self._held.pop(session_id, None)

    def held(self, session_id: int) -> int:
        with self._lock:
            return self._held.get(session_id, 0)

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())
