"""The device's WebSocket transport: runs an `EdgeSession` over a real link.

All protocol logic lives in `edge_sdk.session` (sans-I/O). This module only
carries out the session's commands:

* a reader task decodes incoming frames into an inbox (`Receive`),
* a writer task sends queued frames (`Send`), so uploading step *i* overlaps
  computing step *i+1* (sending a 4 MiB frame through a slow link must not stall
  compute),
* head compute runs in a worker thread (`Compute`) so the event loop keeps the
  socket busy; the device slowdown is emulated by *sleeping* ``(s - 1) x`` the
  compute's CPU time, so a slow device costs wall time, not this machine's cores,
* the clock is read here (`Now`, and the stamps on every frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from edge_sdk.decision.setup import build_controller, initial_choice, is_adaptive
from edge_sdk.device_checkpoint import DeviceCheckpoint
from edge_sdk.session import (
    Closed,
    Command,
    Compute,
    Computed,
    EdgeSession,
    Now,
    ProgressEvent,
    Receive,
    Received,
    Reconnect,
    Reconnected,
    Send,
    Sent,
    Steps,
    TrainingError,
)
from edge_sdk.training import LocalSetup, TrainConfig, TrainResult, build_local
from schemas import frames as fr
from schemas.errors import WireError
from schemas.transport import clear_text_token_warning

__all__ = ["EdgeClient", "LinkCounters", "run_client", "run_training"]

log = logging.getLogger("edge_sdk")

T = TypeVar("T")


@dataclass
class LinkCounters:
    bytes_up: int = 0
    bytes_down: int = 0


class EdgeClient:
    """One training run of one device against one cloud backend, over WebSockets.

    The model and data are loaded here (a bad configuration fails at once);
    profiling the device for the decision engine is the explicit `prepare` step
    (seconds of work), which `run` takes if nobody did. Pass ``session`` to run a
    session built elsewhere (a test's, with its own controller).
    """

    def __init__(
        self,
        url: str,
        cfg: TrainConfig,
        *,
        setup: LocalSetup | None = None,
        session: EdgeSession | None = None,
        progress: Callable[[ProgressEvent], None] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        status: Callable[[str], None] | None = None,
        network: str = "none",
        shared_clock: bool = False,
        resume_from: DeviceCheckpoint | None = None,
    ) -> None:
        self.url = url
        self.resume_from = resume_from
        self.cfg = cfg
        self.setup = session.setup if session is not None else setup or build_local(cfg)
        self.session = session
        self.progress = progress
        self.on_epoch = on_epoch
        self.status = status or (lambda _message: None)  # one line per phase, for a CLI
        self.network = network
        self.shared_clock = shared_clock
        self.counters = LinkCounters()
        self._ws: ClientConnection | None = None
        self._inbox: asyncio.Queue[Received | Closed] = asyncio.Queue()
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random()  # backoff jitter
        self._backoff: Iterator[tuple[int, float]] | None = None  # (attempt, delay) since the latest drop
        self._dropped_at = 0.0
        self._seq = 0
        self.prepare_s = 0.0  # profiling before the run (`prepare`)

    def prepare(self) -> EdgeSession:
        """Profile the device for the decision engine (when any knob is ``auto``)
        and build the session; done once, before connecting."""
        if self.session is None:
            t0 = time.perf_counter()
            if is_adaptive(self.cfg):
                self.status("profiling the device: per-block costs, then whole steps at each candidate cut (a few seconds)")
            controller = build_controller(self.cfg, self.setup, initial_choice(self.cfg, self.setup))
            self.session = EdgeSession(
                self.cfg,
                self.setup,
                controller=controller,
                progress=self.progress,
                on_epoch=self.on_epoch,
                shared_clock=self.shared_clock,
                resume_from=self.resume_from,
            )
            self.prepare_s = time.perf_counter() - t0
        return self.session

    # ------------------------------------------------------------ commands
    async def _drive(self, steps: Steps[T]) -> T:
        """Run a session coroutine to its end, answering each command."""
        answer: Any = None
        while True:
            try:
                command = steps.send(answer)
            except StopIteration as done:
                return done.value
            answer = await self._execute(command)

    async def _execute(self, command: Command) -> Any:
        if isinstance(command, Send):
            return await self._send(command.frame)
        if isinstance(command, Receive):
            if not command.wait and self._inbox.empty():
                return None
            item = await self._inbox.get()
            if isinstance(item, Closed):
                await self._inbox.put(item)  # every later wait sees it too
            return item
        if isinstance(command, Compute):
            return await self._compute(command)
        if isinstance(command, Now):
            return time.perf_counter()
        if isinstance(command, Reconnect):
            return await self._reconnect(command)
        raise TypeError(f"unknown session command {command!r}")

    async def _send(self, frame: fr.Frame) -> Sent:
        assert self.session is not None
        sent_ns = time.monotonic_ns()
        data = fr.encode(fr.Envelope(frame=frame, session=self.session.session_id, seq=self._seq, sent_ns=sent_ns))
        self._seq += 1
        await self._outbox.put(data)
        return Sent(sent_ns, len(data))

    async def _compute(self, command: Compute) -> Computed:
        t0 = time.perf_counter()
        out, cpu_s = await asyncio.to_thread(_timed_on_cpu, command.fn, *command.args, **command.kwargs)
        if command.scaled and self.cfg.device_slowdown > 1.0:
            # (s-1) x the compute's *CPU* time: waiting for this machine's busy cores
            # (cloud and proxy share them in emulation) must not be amplified s-fold.
            await asyncio.sleep((self.cfg.device_slowdown - 1.0) * cpu_s)
        return Computed(out, time.perf_counter() - t0, cpu_s)

    # ---------------------------------------------------------- the socket
    async def _reader(self, ws: ClientConnection, inbox: asyncio.Queue[Received | Closed]) -> None:
        try:
            async for message in ws:
                if isinstance(message, str):
                    continue
                self.counters.bytes_down += len(message)
                recv_ns = time.monotonic_ns()
                try:
                    await inbox.put(Received(fr.decode(message), recv_ns, len(message)))
                except WireError as exc:
                    await inbox.put(Closed(f"cloud sent a malformed frame: {exc}"))
                    return
            reason = f": {ws.close_reason}" if ws.close_reason else ""
            await inbox.put(Closed(f"cloud closed the connection (code {ws.close_code}{reason})"))
        except (ConnectionClosed, OSError) as exc:
            await inbox.put(Closed(f"connection to the cloud was lost ({exc})"))

    async def _writer(
        self, ws: ClientConnection, inbox: asyncio.Queue[Received | Closed], outbox: asyncio.Queue[bytes | None]
    ) -> None:
        try:
            while (data := await outbox.get()) is not None:
                await ws.send(data)
                self.counters.bytes_up += len(data)
        except (ConnectionClosed, OSError) as exc:
            await inbox.put(Closed(f"connection to the cloud was lost while sending ({exc})"))

    def _attach(self, ws: ClientConnection) -> None:
        """A connection of its own queues and tasks: nothing late from an old one mixes in."""
        self._ws = ws
        self._inbox = asyncio.Queue()
        self._outbox = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._reader(ws, self._inbox)),
            asyncio.create_task(self._writer(ws, self._inbox, self._outbox)),
        ]

    async def _hang_up(self, *, goodbye: bool = True) -> None:
        """Stop this connection's tasks and close it. ``goodbye=False`` (to dial
        again) drops it without a closing handshake: a normal close would tell the
        server the session is over instead of to be resumed."""
        for task in self._tasks:
            task.cancel()
        if self._ws is not None:
            if goodbye:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._ws.close(), 5)
            else:
                self._ws.transport.abort()
            self._ws = None

    async def _reconnect(self, command: Reconnect) -> Reconnected | Closed:
        """Dial again with exponential backoff and full jitter until
        ``reconnect_timeout_s`` has passed since the drop (a new drop restarts both)."""
        if command.first or self._backoff is None:
            self._dropped_at = time.monotonic()
            self._backoff = enumerate(backoff_delays(self._rng), 1)
        await self._hang_up(goodbye=False)
        timeout = self.cfg.reconnect_timeout_s
        deadline = self._dropped_at + timeout
        last = command.reason
        for attempt, delay in self._backoff:
            if time.monotonic() + delay > deadline:
                return Closed(f"no connection within {timeout:g} s ({last})")
            self.status(f"{command.reason}; reconnecting in {delay:.1f} s (attempt {attempt})")
            await asyncio.sleep(delay)
            try:
                ws = await self._connect()
            except TrainingError as exc:
                last = str(exc)
                continue
            self._attach(ws)
            return Reconnected()
        raise AssertionError("backoff_delays is endless")

    async def _connect(self) -> ClientConnection:
        if self.cfg.token and (warning := clear_text_token_warning(self.url)):
            log.warning("warning: %s", warning)
        tls = None
        if self.url.startswith("wss://"):
            try:
                tls = ssl.create_default_context(cafile=self.cfg.tls_ca)
            except (OSError, ssl.SSLError) as exc:
                raise TrainingError(f"cannot read the CA certificate {self.cfg.tls_ca}: {exc}") from None
        try:
            return await connect(
                self.url,
                compression=None,
                max_size=fr.MAX_FRAME_BYTES,
                open_timeout=15,
                ping_interval=20,
                ping_timeout=60,
                ssl=tls,
            )
        except (OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError) as exc:
            raise TrainingError(f"cannot connect to the cloud at {self.url}: {exc}") from None

    def request_stop(self, reason: str) -> bool:
        """Ask the run to stop at the next batch (see `EdgeSession.request_stop`);
        False before the session exists (nothing to stop gracefully)."""
        if self.session is None:
            return False
        self.session.request_stop(reason)
        return True

    def partial_result(self, reason: str) -> TrainResult | None:
        """The report so far of a run stopped from outside; None before the session existed."""
        if self.session is None:
            return None
        result = self.session.partial_result(time.perf_counter(), reason)
        result.prepare_s = self.prepare_s
        result.bytes_up, result.bytes_down = self.counters.bytes_up, self.counters.bytes_down
        return result

    async def run(self) -> TrainResult:
        session = self.prepare()
        t0 = time.perf_counter()
        self.status(f"connecting to {self.url}" + ("; then probing the link" if session.controller is not None else ""))
        self._attach(await self._connect())
        finished = False
        try:
            result = await self._drive(session.run(t0, network=self.network))
            finished = True
            await self._outbox.put(None)
            await self._tasks[1]  # the writer: everything queued (the Bye) has gone out
            while not self._inbox.empty():  # nothing reads it any more
                if isinstance(self._inbox.get_nowait(), Closed):
                    log.warning("the link dropped at the very end: the cloud keeps the session until its TTL expires")
                    break
        finally:
            # A run stopped with a checkpoint held leaves without a goodbye: the cloud
            # keeps the session (and its checkpoints) for --resume.
            await self._hang_up(goodbye=finished or session.checkpoint is None)
        if session.checkpoint_store is not None:
            session.checkpoint_store.remove()  # the run is over: nothing to resume
        result.wall_s = time.perf_counter() - t0
        result.prepare_s = self.prepare_s
        result.bytes_up = self.counters.bytes_up
        result.bytes_down = self.counters.bytes_down
        return result


def backoff_delays(rng: random.Random, *, base_s: float = 0.25, cap_s: float = 30.0) -> Iterator[float]:
    """Seconds to wait before each re-dial: exponential backoff with full jitter
    (uniform in [0, min(cap, base * 2^n)]), so a fleet that lost the same server
    does not come back in lock-step."""
    n = 0
    while True:
        yield rng.uniform(0.0, min(cap_s, base_s * 2.0**n))
        n += 1


def _timed_on_cpu(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """Run ``fn`` and return (result, CPU seconds this thread spent in it)."""
    c0 = time.thread_time()
    out = fn(*args, **kwargs)
    return out, time.thread_time() - c0


def run_training(url: str, cfg: TrainConfig, **kwargs: Any) -> TrainResult:
    """Synchronous entry point (benchmarks)."""
    return run_client(EdgeClient(url, cfg, **kwargs))


def run_client(client: EdgeClient) -> TrainResult:
    """Run ``client`` to its end on a fresh event loop, torch seeded from its config
    (the CLI keeps the client, to report on it if the run is stopped)."""
    import torch

    torch.manual_seed(client.cfg.seed)
    return asyncio.run(client.run())
