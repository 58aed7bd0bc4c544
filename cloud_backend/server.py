"""The asyncio WebSocket server: moves bytes between sockets and `CloudSession`s.

All protocol logic lives in `cloud_backend.session` (sans-I/O). This layer only

* accepts connections (optionally TLS, capped at ``max_sessions``),
* decodes frames with limits, answering a malformed frame with an ``Error`` frame
  and carrying on (other sessions never notice),
* runs each session's compute in a worker thread so the event loop keeps reading
  the next step's features while the current step computes (that overlap is what
  the pipeline is for), and
* stamps outgoing envelopes with the send time for the device's bandwidth estimate.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from dataclasses import dataclass, field

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cloud_backend.session import CloudSession, Phase, SessionConfig
from schemas.errors import ErrorCode, WireError
from schemas.frames import Envelope, Error, Limits, decode, encode

log = logging.getLogger("cloud_backend")

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_sessions: int = 64
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    context_every: int = 10


@dataclass
class ServerStats:
    sessions_total: int = 0
    sessions_active: int = 0
    frames_in: int = 0
    frames_out: int = 0
    bad_frames: int = 0
    sessions: dict[int, CloudSession] = field(default_factory=dict)
    #: one summary per ended session: id, train steps applied, last step id
    closed: list[dict[str, int]] = field(default_factory=list)


class CloudServer:
    """Owns the listening socket and one `CloudSession` per connection."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stats = ServerStats()
        self._ids = itertools.count(1)
        self._server: Server | None = None
        self._limits = Limits(max_frame_bytes=config.max_frame_bytes)

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.sockets[0].getsockname()[1]

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not (self.config.tls_cert or self.config.tls_key):
            return None
        if not (self.config.tls_cert and self.config.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return ctx

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            ssl=self._ssl_context(),
            # Features are already compressed; deflate costs 15x throughput (see issue 4).
            compression=None,
            max_size=self.config.max_frame_bytes,
            max_queue=64,
            ping_interval=20,
            ping_timeout=60,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> "CloudServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ connections
    async def _send(self, ws: ServerConnection, session_id: int, seq: itertools.count, frame: object) -> None:
        data = encode(Envelope(frame=frame, session=session_id, seq=next(seq), sent_ns=time.monotonic_ns()))
        await ws.send(data)
        self.stats.frames_out += 1

    async def _handle(self, ws: ServerConnection) -> None:
        session_id = next(self._ids)
        seq = itertools.count()
        if self.stats.sessions_active >= self.config.max_sessions:
            await self._send(ws, session_id, seq, Error(code=ErrorCode.SERVER_BUSY, message=f"server is at its limit of {self.config.max_sessions} sessions", step=-1))
            await ws.close(1013, "server busy")
            return
        session = CloudSession(session_id, SessionConfig(token=self.config.token, context_every=self.config.context_every))
        self.stats.sessions_total += 1
        self.stats.sessions_active += 1
        self.stats.sessions[session_id] = session
        inbox: asyncio.Queue[tuple[Envelope, int] | None] = asyncio.Queue()
        worker = asyncio.create_task(self._work(ws, session, inbox, seq))
        log.info("session %d opened from %s", session_id, ws.remote_address)
        try:
            async for message in ws:
                recv_ns = time.monotonic_ns()
                self.stats.frames_in += 1
                if isinstance(message, str):
                    self.stats.bad_frames += 1
                    await self._send(ws, session_id, seq, Error(code=ErrorCode.MALFORMED, message="text messages are not part of the protocol; send binary frames", step=-1))
                    continue
                try:
                    envelope = decode(message, self._limits)
                except WireError as exc:
                    self.stats.bad_frames += 1
                    await self._send(ws, session_id, seq, Error(code=exc.code, message=exc.message, step=-1))
                    continue
                await inbox.put((envelope, recv_ns))
                if session.phase is Phase.CLOSED:
                    break
        except ConnectionClosed:
            pass
        finally:
            await inbox.put(None)
            try:
                await worker
            except ConnectionClosed:
                pass
            self.stats.sessions_active -= 1
            self.stats.sessions.pop(session_id, None)
            self.stats.closed.append({"session": session_id, "steps": session.applied_steps, "last_step": session.last_step})
            log.info("session %d closed after %d train steps", session_id, session.applied_steps)

    async def _work(self, ws: ServerConnection, session: CloudSession, inbox: asyncio.Queue, seq: itertools.count) -> None:
        """Apply frames in arrival order, one at a time, off the event loop."""
        while True:
            item = await inbox.get()
            if item is None:
                return
            envelope, recv_ns = item
            session.queue_depth = inbox.qsize()
            replies = await asyncio.to_thread(session.handle, envelope.frame, recv_ns=recv_ns)
            for reply in replies:
                await self._send(ws, session.session_id, seq, reply)
                if isinstance(reply, Error) and session.phase is Phase.AWAIT_HELLO:
                    # A refused Hello ends the session: say why, then close.
                    await ws.close(1008, reply.message[:120])
                    return
