"""A shaping TCP proxy that makes loopback behave like a device's network link.

The emulated edge connects to the proxy, the proxy connects to the real cloud
server, and every byte crosses an emulated link in each direction:

* **serialization**: a chunk of ``n`` bytes occupies its direction of the link for
  ``n * 8 / bandwidth`` seconds; chunks are serialized one after another (FIFO),
  so a large upload delays a small message queued behind it, as on a real link;
* **propagation**: after serialization the chunk arrives ``one_way_latency`` later;
  this is pipelined, so many chunks can be in flight during the latency.

The link is *shared* by all connections through one proxy (the device has one
radio): two concurrent uploads each get about half the uplink. Bandwidth and
latency are read from the profile or trace at the moment a chunk starts to
serialize, so a :class:`~edge_sdk.emulation.network.NetworkTrace` changes them
mid-connection. Bandwidth counts payload bytes (goodput, as speed tests report),
not TCP/IP headers.

Why chunks are cut into quanta: a 64 KiB read at 2 Mbit/s occupies the link for
262 ms; delivering it in one piece would make the receiver see bursts and would
let a chunk from another connection wait behind all of it. Quanta of about 1 ms
of link time (at least one 1500-byte packet, at most 16 KiB) keep delivery smooth.

Why a timer thread: asyncio's epoll timeouts are rounded up to whole milliseconds
(twice, in CPython 3.11: once in ``selectors`` and once in ``select.epoll``), so
``asyncio.sleep`` overshoots by 0-2 ms. At a 5 ms one-way latency that is a 20-40 %
error, so delivery deadlines are kept by one background thread using
``threading.Condition.wait`` (sub-0.2 ms on Linux), which wakes the loop through
``call_soon_threadsafe``. Delays the proxy only uses for back-pressure, where
exactness does not matter, use plain ``asyncio.sleep``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import heapq
import itertools
import logging
import signal
import sys
import threading
import time

from edge_sdk.emulation.faults import FaultSchedule
from edge_sdk.emulation.network import LinkProfile, Network, network_choices, parse_network

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
QUANTUM_S = 0.001  # link time per delivery quantum
MIN_QUANTUM = 1500  # one Ethernet-sized packet
MAX_QUANTUM = 16 * 1024
BACKLOG_S = 0.010  # how far ahead of real time a reader may fill the link
MAX_QUEUED_BYTES = 4 * 1024 * 1024  # per direction per connection, awaiting delivery


@dataclasses.dataclass(frozen=True)
class ProxyStats:
    """Payload bytes delivered per direction, and connections accepted so far."""

    bytes_up: int
    bytes_down: int
    connections: int
    active_connections: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _PreciseTimer:
    """Wakes asyncio futures at monotonic deadlines with sub-millisecond accuracy.

    See the module docstring for why asyncio's own timers are not good enough.
    Deadlines are in ``loop.time()`` units, converted to ``time.monotonic()``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="shaping-proxy-timer", daemon=True)
        self._thread.start()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - self._loop.time()
        if delay <= 0:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fut))
            self._cond.notify()
        await fut

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, _, fut = heapq.heappop(self._heap)
                    try:
                        self._loop.call_soon_threadsafe(_wake, fut)
                    except RuntimeError:  # loop closed under us; nothing left to wake
                        self._closed = True
                        break

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=1.0)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # it may have been cancelled meanwhile
        fut.set_result(None)


class _LinkDirection:
    """One direction of the shared link: when its serializer is next free."""

    def __init__(self) -> None:
        self.free_at = 0.0


_EOF = None


class _Pipe:
    """One direction of one connection: chunks scheduled on the link awaiting delivery."""

    def __init__(self) -> None:
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued_bytes = 0
        self.last_deliver_at = 0.0
        self.has_data = asyncio.Event()
        self.has_space = asyncio.Event()
        self.has_space.set()

    def put(self, deliver_at: float, data: bytes | None) -> None:
        # TCP is in order: a latency drop in a trace must not overtake earlier data.
        deliver_at = max(deliver_at, self.last_deliver_at)
        self.last_deliver_at = deliver_at
        self.queue.append((deliver_at, data))
        if data:
            self.queued_bytes += len(data)
            if self.queued_bytes >= MAX_QUEUED_BYTES:
                self.has_space.clear()
        self.has_data.set()


class ShapingProxy:
    """Listen on loopback, forward to ``target``, shape each direction like ``network``.

    ``network`` is a :class:`LinkProfile`, a :class:`NetworkTrace` (anything with
    ``at(t) -> LinkProfile``) or ``None`` for an unshaped pass-through that still
    counts bytes. Trace time 0 is when :meth:`start` runs. ``proxy.network`` may
    be reassigned while running (the next chunk on the link uses it); a switch
    between ``None`` and a shaped network only affects connections opened after it.

    Use ``async with ShapingProxy(target=("127.0.0.1", 8765), network=PROFILES["4g"]) as p:``
    and connect to ``("127.0.0.1", p.port)``.
    """

    def __init__(
        self,
        target: tuple[str, int],
        network: Network | None = None,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        faults: FaultSchedule | None = None,
    ) -> None:
        self.target = (target[0], int(target[1]))
        self.faults = faults
        self.cuts = 0  # faults carried out (`cut`, `stall`)
        self.stalls = 0
        self._stalled_until = 0.0  # loop time: nothing is delivered before it
        self._fault_task: asyncio.Task[None] | None = None
        self.network = network
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._server: asyncio.base_events.Server | None = None
        self._timer: _PreciseTimer | None = None
        self._t0 = 0.0
        self._up = _LinkDirection()
        self._down = _LinkDirection()
        self._bytes_up = 0
        self._bytes_down = 0
        self._connections = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> ShapingProxy:
        loop = asyncio.get_running_loop()
        self._timer = _PreciseTimer(loop)
        try:
            self._server = await asyncio.start_server(self._on_client, self.listen_host, self._listen_port)
        except BaseException:
            self._timer.close()
            self._timer = None
            raise
        self._t0 = loop.time()
        if self.faults is not None:
            self._fault_task = asyncio.create_task(self._run_faults(self.faults))
        return self

    async def _run_faults(self, faults: FaultSchedule) -> None:
        loop = asyncio.get_running_loop()
        for at, stall_s in faults.events():
            await asyncio.sleep(max(0.0, self._t0 + at - loop.time()))
            if stall_s is None:
                self.cut()
            else:
                self.stall(stall_s)

    async def close(self) -> None:
        """Stop listening and drop every open connection (without flushing)."""
        self._closing = True
        if self._fault_task is not None:
            self._fault_task.cancel()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def cut(self) -> int:
        """A fault: drop every open connection at once, both ways, without a
        closing handshake or a flush (what a lost radio or a NAT reset looks like
        to both ends), and keep listening. Returns how many connections it cut."""
        open_writers = list(self._writers)
        for writer in open_writers:
            writer.transport.abort()
        self.cuts += 1
        return len(open_writers) // 2

    def stall(self, seconds: float) -> None:
        """A fault: deliver nothing either way for ``seconds`` (a radio fade or a
        blackholed route: over TCP the bytes arrive late, not never); connections
        stay open, so a session should ride it out without reconnecting."""
        loop = asyncio.get_running_loop()
        self._stalled_until = max(self._stalled_until, loop.time() + seconds)
        self.stalls += 1

    async def _wait_unless_stalled(self) -> None:
        wait = self._stalled_until - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
            await self._wait_unless_stalled()  # the stall may have been extended meanwhile

    async def __aenter__(self) -> ShapingProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    def elapsed(self) -> float:
        """Seconds since start: the time at which a trace is read."""
        return asyncio.get_running_loop().time() - self._t0

    def stats(self) -> ProxyStats:
        return ProxyStats(self._bytes_up, self._bytes_down, self._connections, len(self._handlers))

    # -- connections ---------------------------------------------------------------

    async def _on_client(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(client_writer)
        self._connections += 1
        server_writer: asyncio.StreamWriter | None = None
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.target)
            except OSError as exc:
                log.warning("shaping proxy: cannot reach target %s:%s: %s", *self.target, exc)
                return
            self._writers.add(server_writer)
            up = asyncio.create_task(self._pump(client_reader, client_writer, server_writer, upstream=True))
            down = asyncio.create_task(self._pump(server_reader, server_writer, client_writer, upstream=False))
            pending: set[asyncio.Task[None]] = {up, down}
            try:
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    if any(t.exception() is not None for t in done):
                        # A reset or a broken pipe: the connection is gone both ways.
                        for t in done:
                            log.debug("shaping proxy: connection error: %r", t.exception())
                        break
            finally:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        except asyncio.CancelledError:
            # CPython 3.11's start_server callback calls task.exception() on the
            # handler and logs an error if the task ended cancelled; end it normally
            # when the cancellation is ours (close()).
            if not self._closing:
                raise
        finally:
            for writer in (client_writer, server_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            self._handlers.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        source: asyncio.StreamWriter,
        writer: asyncio.StreamWriter,
        upstream: bool,
    ) -> None:
        """Move one direction: read, schedule on the link, deliver; then forward EOF.

        ``source`` is the transport ``reader`` reads from: if delivery fails (the
        receiver reset), aborting it unblocks a pending read so the error surfaces
        instead of the connection hanging on an idle sender.
        """
        if self.network is None:  # chosen per connection; swapping networks affects new ones
            await self._pump_unshaped(reader, writer, upstream)
            return
        pipe = _Pipe()
        deliver = asyncio.create_task(self._deliver(pipe, writer, upstream))

        def on_deliver_done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                source.transport.abort()

        deliver.add_done_callback(on_deliver_done)
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                await self._schedule(pipe, data, upstream)
                if deliver.done():  # the writer failed; surface its error
                    break
            if not deliver.done():
                loop = asyncio.get_running_loop()
                latency = self._settings(max(loop.time(), self._link(upstream).free_at), upstream)[1]
                pipe.put(loop.time() + latency, _EOF)  # the FIN travels the link too
            await deliver
        finally:
            if not deliver.done():
                deliver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await deliver

    async def _pump_unshaped(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            await self._wait_unless_stalled()
            writer.write(data)
            self._count(len(data), upstream)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    def _link(self, upstream: bool) -> _LinkDirection:
        return self._up if upstream else self._down

    def _settings(self, at_time: float, upstream: bool) -> tuple[float, float]:
        """(bits per second, one-way latency) in force at loop time ``at_time``."""
        network = self.network
        if network is None:  # switched to unshaped mid-connection
            return float("inf"), 0.0
        profile: LinkProfile = network.at(at_time - self._t0)
        if upstream:
            return profile.uplink_bps, profile.one_way_latency_up_s
        return profile.downlink_bps, profile.one_way_latency_down_s

    async def _schedule(self, pipe: _Pipe, data: bytes, upstream: bool) -> None:
        """Put ``data`` on the link in quanta; wait while the link is too far behind."""
        loop = asyncio.get_running_loop()
        link = self._link(upstream)
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            now = loop.time()
            start = max(now, link.free_at)
            bps, latency = self._settings(start, upstream)
            quantum = min(MAX_QUANTUM, max(MIN_QUANTUM, int(bps * QUANTUM_S / 8))) if bps != float("inf") else len(data)
            piece = bytes(view[offset : offset + quantum])
            offset += len(piece)
            end = start + len(piece) * 8 / bps
            link.free_at = end
            pipe.put(end + latency, piece)
            # Back-pressure: keep only BACKLOG_S of serialization queued ahead of now,
            # so the sender's TCP window fills up as it would behind a slow link.
            ahead = end - loop.time() - BACKLOG_S
            if ahead > 0:
                await asyncio.sleep(ahead)
            if not pipe.has_space.is_set():
                await pipe.has_space.wait()

    async def _deliver(self, pipe: _Pipe, writer: asyncio.StreamWriter, upstream: bool) -> None:
        """Write each quantum when it arrives; forward EOF as a half-close."""
        loop = asyncio.get_running_loop()
        assert self._timer is not None
        timer = self._timer
        while True:
            if not pipe.queue:
                pipe.has_data.clear()
                await pipe.has_data.wait()
                continue
            await timer.sleep_until(pipe.queue[0][0])
            await self._wait_unless_stalled()
            now = loop.time()
            batch: list[bytes] = []
            eof = False
            while pipe.queue and pipe.queue[0][0] <= now:
                _, data = pipe.queue.popleft()
                if data is _EOF:
                    eof = True
                    break
                batch.append(data)
            if batch:
                payload = b"".join(batch)
                writer.write(payload)
                self._count(len(payload), upstream)
                pipe.queued_bytes -= len(payload)
                if pipe.queued_bytes < MAX_QUEUED_BYTES:
                    pipe.has_space.set()
                await writer.drain()
            if eof:
                if writer.can_write_eof():
                    writer.write_eof()
                return

    def _count(self, n: int, upstream: bool) -> None:
        if upstream:
            self._bytes_up += n
        else:
            self._bytes_down += n


class ProxyThread:
    """A :class:`ShapingProxy` on its own event loop in a daemon thread.

    Why: if the edge runs its training steps on the same event loop as the proxy,
    every blocking compute step freezes the emulated link too (no delivery while
    torch runs), which distorts exactly the overlap the pipeline is meant to show.
    A separate thread keeps the link's clock going; torch releases the GIL in its
    kernels. Use ``with ProxyThread(target, network) as p: connect to p.port``.
    """

    def __init__(self, target: tuple[str, int], network: Network | None = None, **kwargs: object) -> None:
        self.proxy = ShapingProxy(target, network, **kwargs)  # type: ignore[arg-type]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> ProxyThread:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.proxy.start())
            except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
                loop.run_until_complete(self.proxy.close())
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="shaping-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("shaping proxy thread did not start")
        if failure:
            raise failure[0]
        return self

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._thread = None

    @property
    def port(self) -> int:
        return self.proxy.port

    def stats(self) -> ProxyStats:
        return self.proxy.stats()

    def cut(self) -> None:
        """`ShapingProxy.cut`, from any thread."""
        assert self._loop is not None, "proxy not started"
        self._loop.call_soon_threadsafe(self.proxy.cut)

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- standalone use ------------------------------------------------------------------


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _parse_network_arg(text: str) -> Network | None:
    try:
        return parse_network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edge_sdk.emulation.proxy",
        description="Shaping TCP proxy: forwards LISTEN to TARGET through an emulated link "
        "(bandwidth and one-way latency per direction; uplink = client to target).",
    )
    parser.add_argument("--listen", type=int, default=0, metavar="PORT", help="port to listen on (default: a free one, printed)")
    parser.add_argument("--listen-host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--target", type=_parse_hostport, required=True, metavar="HOST:PORT", help="server to forward to")
    parser.add_argument(
        "--network",
        type=_parse_network_arg,
        default="wifi",
        metavar="SPEC",
        help=f"link to emulate: {network_choices()} (default wifi)",
    )
    return parser


async def _serve(args: argparse.Namespace) -> None:
    async with ShapingProxy(
        target=args.target, network=args.network, listen_host=args.listen_host, listen_port=args.listen
    ) as proxy:
        desc = args.network.describe() if args.network is not None else "unshaped"
        print(f"shaping proxy on {proxy.listen_host}:{proxy.port} -> {args.target[0]}:{args.target[1]} ({desc})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print(f"stats: {proxy.stats().as_dict()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
