"""The server's memory shared by its sessions (``serve --max-memory``).

A new session *reserves* its estimated need (`ModelPlan.memory_bytes`: tail
weights, optimizer state, reply cache, one step's activations) at ``Hello``:
checked, refused when others hold the rest. After that it only *holds* what it
needs (weights on their way in, a moved cut, a restore), never refused: ending a
running training for another tenant's load would be worse than a sum that runs
over by at most the per-session limit. Each entry replaces the key's previous
one. Keys are per session *object* (`CloudSession.budget_key`): a restore builds
a second object for the same session id. The check and the update are one step
under a lock: sessions compute in worker threads, and two Hellos must not both
take the last free megabytes.

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

    def reserve(self, key: int, nbytes: int) -> None:
        """Hold ``nbytes`` for ``key`` (instead of what it held), or raise
        `WireError`: ``LIMIT_EXCEEDED`` if it would never fit, ``SERVER_BUSY`` if
        other sessions hold the rest."""
        mib = 2**20
        if nbytes > self.total_bytes:
            raise WireError(
                ErrorCode.LIMIT_EXCEEDED,
                f"this session would need about {nbytes / mib:.0f} MiB; the whole server has {self.total_bytes / mib:.0f} MiB",
            )
        with self._lock:
            others = sum(v for k, v in self._held.items() if k != key)
            if others + nbytes > self.total_bytes:
                raise WireError(
                    ErrorCode.SERVER_BUSY,
                    f"server memory is taken: this session would need about {nbytes / mib:.0f} MiB, "
                    f"{(self.total_bytes - others) / mib:.0f} of {self.total_bytes / mib:.0f} MiB are free "
                    f"({len(self._held) - (key in self._held)} other sessions hold the rest); try again later",
                )
            self._held[key] = int(nbytes)

    def hold(self, key: int, nbytes: int) -> None:
        """Set ``key``'s reservation without a check: what a session already
        holds (its cut after a move that was checked, or a refused move undone)."""
        with self._lock:
            self._held[key] = int(nbytes)

    def release(self, key: int) -> None:
        with self._lock:
            self._held.pop(key, None)

    def held(self, key: int) -> int:
        with self._lock:
            return self._held.get(key, 0)

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())
