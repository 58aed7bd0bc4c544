"""One process-wide lock between building models and running them.

Building some zoo models FX-traces them (`BlockModel.from_module`, e.g. the
ResNets), and `torch.fx.Tracer` patches ``torch.nn.Module.__call__`` and
``__getattr__`` *on the class*, for every thread, while it traces. A session
whose worker thread runs a forward pass during another session's Hello then
goes through the tracer and fails (``NameError: module is not installed as a
submodule``; found by ``bench/fuzz_live.py``). So builds are exclusive and
compute is shared: any number of sessions compute at once, and a build waits
for them and blocks new ones for its duration (a fraction of a second).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MODEL_LOCK", "SharedExclusiveLock"]


class SharedExclusiveLock:
    """A readers-writer lock that prefers writers (a build is never starved)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_exclusive += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


#: Model builds (exclusive) against forward/backward passes (shared) in a server process.
MODEL_LOCK = SharedExclusiveLock()
