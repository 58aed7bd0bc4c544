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
from edge_sdk.session import Command, Compute, Computed, EdgeSession, Now, Receive, Received, Send, Sent, Steps
from schemas import frames as fr

T = TypeVar("T")


class Stuck(RuntimeError):
    """The device waits for a frame, and nothing is on its way."""


class InProcessLink:
    """Drives ``edge`` against ``cloud``; the clock advances ``tick_ns`` per read."""

    def __init__(self, edge: EdgeSession, cloud: CloudSession, *, tick_ns: int = 1_000_000) -> None:
        self.edge = edge
        self.cloud = cloud
        self.tick_ns = tick_ns
        self.clock_ns = 0
        self.inbox: deque[Received] = deque()
        self.sent: list[Any] = []  # every frame the device sent, decoded as the cloud saw it
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
        raise TypeError(f"unknown session command {command!r}")

    def _send(self, frame: fr.Frame) -> Sent:
        sent_ns = self._tick()
        data = fr.encode(fr.Envelope(frame=frame, session=self.edge.session_id, seq=self._seq, sent_ns=sent_ns))
        self._seq += 1
        seen = fr.decode(data).frame
        self.sent.append(seen)
        for reply in self.cloud.handle(seen, recv_ns=self._tick()):
            out = fr.encode(fr.Envelope(frame=reply, session=self.cloud.session_id, sent_ns=self._tick()))
            self.inbox.append(Received(fr.decode(out), self._tick(), len(out)))
        return Sent(sent_ns, len(data))
