"""An `EdgeSession` and a `CloudSession` joined by function calls: no socket,
no thread, no wall clock.

Both state machines are the production ones and every frame goes through the
real encoder and decoder, so what this proves about the protocol holds over the
WebSocket transport too. The cloud answers each frame as it is sent, so a
session that waits for a frame the cloud never sends is a protocol bug; it is
reported as one instead of hanging. Used by the tests (repartition, device-only
round trips, program runtimes) and for exact, deterministic experiments.
"""

from __future__ import annotations

from collections import deque
from typing import Any, TypeVar

from cloud_backend.session import CloudSession
from cloud_backend.state_dir import StateDir
from edge_sdk.session import (
    Closed,
    Command,
    Compute,
    Computed,
    EdgeSession,
    Now,
    Receive,
    Received,
    Reconnect,
    Reconnected,
    Send,
    Sent,
    Steps,
)
from schemas import frames as fr

T = TypeVar("T")


class Stuck(RuntimeError):
    """The device waits for a frame, and nothing is on its way."""


class InProcessLink:
    """Drives ``edge`` against ``cloud``; the clock advances ``tick_ns`` per read.

    ``cuts`` drops the link around chosen sends (1-based count of the device's
    sends): ``"request"`` loses that frame before the cloud sees it, ``"reply"``
    lets the cloud apply it and loses its answers. Either way everything in flight
    is gone, the device's next receive reports the drop, and a `Reconnect` brings
    the link back (the server's part, routing a resuming Hello to
    `CloudSession.resume`, is done here). ``"restart"`` is a cut that also loses
    the cloud session before it sees the frame, ``"restart-late"`` after it
    handled it (a checkpoint saved, its ack lost): like a killed server, it
    comes back from ``state``'s checkpoints (which the link writes when the
    session asks, as the server does) at the step the device's resume names."""

    def __init__(
        self,
        edge: EdgeSession,
        cloud: CloudSession,
        *,
        tick_ns: int = 1_000_000,
        cuts: dict[int, str] | None = None,
        state: StateDir | None = None,
    ) -> None:
        self.edge = edge
        self.cloud: CloudSession | None = cloud
        self.config = cloud.config
        self.state = state
        self.restarts = 0
        self.tick_ns = tick_ns
        self.clock_ns = 0
        self.inbox: deque[Received | Closed] = deque()
        self.sent: list[Any] = []  # every frame the cloud saw, decoded as it saw it
        self.cuts = dict(cuts or {})
        self.sends = 0
        self.reconnects = 0
        self._down = False
        self._seq = 0

    def _tick(self) -> int:
        self.clock_ns += self.tick_ns
        return self.clock_ns

    def drive(self, steps: Steps[T]) -> T:
        """Run a session coroutine to its end; returns its value."""
        answer: Any = None
        while True:
            try:
                command = steps.send(answer)
            except StopIteration as done:
                return done.value
            answer = self._execute(command)

    def _execute(self, command: Command) -> Any:
        if isinstance(command, Send):
            return self._send(command.frame)
        if isinstance(command, Receive):
            if self.inbox:
                return self.inbox.popleft()
            if command.wait:
                raise Stuck("the device waits for a frame the cloud will not send")
            return None
        if isinstance(command, Compute):
            return Computed(command.fn(*command.args, **command.kwargs), 0.0, 0.0)
        if isinstance(command, Now):
            return self._tick() / 1e9
        if isinstance(command, Reconnect):
            self._down = False
            self.inbox.clear()
            self.reconnects += 1
            return Reconnected()
        raise TypeError(f"unknown session command {command!r}")

    def _cut(self) -> None:
        self._down = True
        self.inbox.clear()
        self.inbox.append(Closed("the link was cut"))

    def _send(self, frame: fr.Frame) -> Sent:
        sent_ns = self._tick()
        data = fr.encode(fr.Envelope(frame=frame, session=self.edge.session_id, seq=self._seq, sent_ns=sent_ns))
        self._seq += 1
        self.sends += 1
        cut = self.cuts.pop(self.sends, None)
        if cut == "restart":
            self.cloud = None  # the server died: only what it saved survives
            self.restarts += 1
        if self._down or cut in ("request", "restart"):
            if cut:
                self._cut()
            return Sent(sent_ns, len(data))
        seen = fr.decode(data).frame
        self.sent.append(seen)
        replies: list[fr.Frame]
        if isinstance(seen, fr.Hello) and seen.resume_session:
            if self.cloud is None or seen.resume_restart:
                if self.state is None:
                    raise Stuck("the cloud restarted with nothing saved")
                self.cloud = self.state.restore(seen.resume_session, seen.resume_step, self.config, seen.resume_token)
            replies = list(self.cloud.resume(seen))
        else:
            assert self.cloud is not None
            replies = self.cloud.handle(seen, recv_ns=self._tick())
            pending, self.cloud.pending_checkpoint = self.cloud.pending_checkpoint, None
            if pending is not None and self.state is not None:
                self.state.store(self.cloud.session_id).save(*pending)
        if cut == "restart-late":
            self.cloud = None
            self.restarts += 1
        if cut in ("reply", "restart-late"):
            self._cut()
            return Sent(sent_ns, len(data))
        for reply in replies:
            out = fr.encode(fr.Envelope(frame=reply, session=self.edge.session_id, sent_ns=self._tick()))
            self.inbox.append(Received(fr.decode(out), self._tick(), len(out)))
        return Sent(sent_ns, len(data))
