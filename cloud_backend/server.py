"""The asyncio WebSocket server: moves bytes between sockets and `CloudSession`s.

All protocol logic lives in `cloud_backend.session` (sans-I/O). This layer only

* accepts connections (optionally TLS) and admits them in two stages: a
  connection is *unauthenticated* until its ``Hello`` is accepted, and those are
  capped separately (``max_unauthenticated``), held to a deadline
  (``hello_timeout_s``) and to small frames (``max_hello_bytes``); a session slot
  (``max_sessions``) is taken only by a Hello that carries the right token, so
  idle or hostile connections cannot lock devices out;
* decodes frames with limits, answering a malformed frame with an ``Error`` frame
  and carrying on (other sessions never notice);
* runs each session's compute in a worker thread so the event loop keeps reading
  the next step's features while the current step computes (that overlap is what
  the pipeline is for), through a *bounded* inbox: when it is full the server
  stops reading that socket and TCP pushes back on the sender, so a device that
  floods frames cannot grow the server's memory;
* closes sessions that stop talking (``idle_timeout_s``) and drops a closed
  session's pending work; a session whose connection was lost without a goodbye
  (the network dropped, pings went unanswered) is *detached*: kept, with its slot,
  for ``session_ttl_s`` for its device to resume (``_resume``), then freed. Every
  other path out frees the slot (``try/finally``);
* with ``state_dir``, writes each session's checkpoints when the session asks
  (`CloudSession.pending_checkpoint`) and, after a restart, restores a session
  from its checkpoint when its device resumes (`cloud_backend.state_dir`);
* stamps outgoing envelopes with the send time for the device's bandwidth estimate.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import secrets
import ssl
import time
from dataclasses import dataclass, field

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import DATA_OPCODES, CloseCode, Opcode
from websockets.frames import Frame as WsFrame
from websockets.http11 import Request, Response

from cloud_backend.memory_budget import MemoryBudget
from cloud_backend.metrics import ServerMetrics, SessionView
from cloud_backend.session import DEFAULT_SESSION_BYTES, CloudSession, Phase, SessionConfig
from cloud_backend.state_dir import StateDir, WrongResumeToken
from edge_sdk.checkpoints import CheckpointError
from schemas.errors import ErrorCode, WireError
from schemas.frames import (
    MAX_FRAME_BYTES,
    CheckpointAck,
    Envelope,
    Error,
    Features,
    Frame,
    Gradients,
    Hello,
    HelloAck,
    Limits,
    decode,
    encode,
)
from schemas.transport import is_loopback

log = logging.getLogger("cloud_backend")

#: Frames before authentication: a Hello is a few hundred bytes.
DEFAULT_MAX_HELLO_BYTES = 64 * 1024


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_sessions: int = 64
    #: connections still without an accepted Hello; counted apart from sessions
    max_unauthenticated: int = 256
    #: from TCP accept to an accepted Hello (the WebSocket handshake included)
    hello_timeout_s: float = 10.0
    #: an authenticated session that sends nothing for this long is closed
    idle_timeout_s: float = 300.0
    #: WebSocket keepalive: a peer that does not answer a ping in time is gone
    #: (this also ends a frame trickled byte by byte: its pong cannot arrive)
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 60.0  # a pong can wait behind a large frame on a slow uplink
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_hello_bytes: int = DEFAULT_MAX_HELLO_BYTES
    #: decoded frames waiting for a session's worker; beyond that, reading stops
    inbox_frames: int = 8
    max_session_bytes: int = DEFAULT_SESSION_BYTES
    context_every: int = 10
    #: emulation: every session's compute takes this many times longer
    cloud_slowdown: float = 1.0
    #: a session whose connection dropped waits this long for its device to resume
    session_ttl_s: float = 600.0
    #: checkpoints and the resume-token key live here, so sessions survive a restart
    state_dir: str | None = None
    #: memory all sessions together may hold (their estimates); None: no shared cap
    max_memory_bytes: int | None = None
    #: serve Prometheus metrics over HTTP on this port (0: a free one); None: no endpoint
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if self.token is not None and not self.token:
            raise ValueError("an empty token would mean no authentication; omit the token to serve without one")
        for name in (
            "max_sessions",
            "max_unauthenticated",
            "max_frame_bytes",
            "max_hello_bytes",
            "inbox_frames",
            "max_session_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("hello_timeout_s", "idle_timeout_s", "ping_interval_s", "ping_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if not (self.session_ttl_s >= 0 and math.isfinite(self.session_ttl_s)):
            raise ValueError(f"session_ttl_s must be >= 0, got {self.session_ttl_s}")
        if not (self.cloud_slowdown >= 1.0 and math.isfinite(self.cloud_slowdown)):
            raise ValueError(f"cloud_slowdown must be >= 1, got {self.cloud_slowdown}")
        if self.max_memory_bytes is not None and self.max_memory_bytes <= 0:
            raise ValueError(f"max_memory_bytes must be positive, got {self.max_memory_bytes}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535, got {self.metrics_port}")

    @property
    def token_in_clear(self) -> bool:
        """True when a token would cross a non-loopback network without TLS."""
        return bool(self.token) and not self.tls_cert and not is_loopback(self.host)


@dataclass
class ServerStats:
    sessions_total: int = 0
    sessions_active: int = 0  # with a connection
    #: sessions whose connection dropped, kept for ``session_ttl_s`` awaiting a resume
    sessions_detached: int = 0
    #: connections that have not (yet) had a Hello accepted
    unauthenticated: int = 0
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: train steps applied, all sessions
    train_steps: int = 0
    bad_frames: int = 0
    sessions: dict[int, CloudSession] = field(default_factory=dict)
    #: one summary per ended session (the latest 1024): id, train steps applied, last step id
    closed: collections.deque[dict[str, int]] = field(default_factory=lambda: collections.deque(maxlen=1024))


class _WholeMessageConnection(ServerConnection):
    """A connection that refuses fragmented messages.

    The protocol sends every frame as one WebSocket message, and the library only
    hands over whole messages: a message trickled as many tiny fragments, with
    pongs in between, would keep a session open until the idle timeout. So a
    fragment ends the connection at once (1008)."""

    def process_event(self, event: Request | Response | WsFrame) -> None:
        if isinstance(event, WsFrame) and event.opcode in DATA_OPCODES and (not event.fin or event.opcode is Opcode.CONT):
            self.protocol.fail(CloseCode.POLICY_VIOLATION, "fragmented messages are not part of the protocol")
            self.send_data()
            return
        super().process_event(event)


@dataclass
class _ReadState:
    """Whether a session's reader is holding off the socket (its inbox is full)."""

    paused: bool = False
    paused_since_ping: bool = False


def _peer(ws: ServerConnection) -> str:
    addr = ws.remote_address
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


class _Refused(Exception):
    """A connection ends before it became a session (the peer was told why)."""


class CloudServer:
    """Owns the listening socket and one `CloudSession` per authenticated connection."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stats = ServerStats()
        self._server: Server | None = None
        self._limits = Limits(max_frame_bytes=config.max_frame_bytes)
        self._idle = asyncio.Event()
        self._idle.set()
        #: checkpoints and the resume-token key, kept across restarts (``--state-dir``)
        self.state = StateDir(config.state_dir) if config.state_dir else None
        #: resume tokens are HMACs under this key (per process, or kept in the state dir)
        self._secret = self.state.secret() if self.state is not None else secrets.token_bytes(32)
        #: sessions found on disk at start-up: freed after the TTL unless a device resumes them
        self._on_disk = set(self.state.session_ids()) if self.state is not None else set()
        self._ids = itertools.count(max(self._on_disk, default=0) + 1)
        self._attached: dict[int, ServerConnection] = {}  # session id -> its open connection
        self._released: dict[int, asyncio.Event] = {}  # set when that connection's serving ended
        self._expiry: dict[int, asyncio.TimerHandle] = {}  # detached session -> its TTL
        #: one resume at a time per session: a device that re-dials during a slow restore waits
        self._resuming: dict[int, asyncio.Lock] = {}
        self._closing = False
        self._removals: set[asyncio.Future[None]] = set()  # checkpoint folders being deleted
        #: the memory the sessions share (``--max-memory``)
        self.budget = MemoryBudget(config.max_memory_bytes) if config.max_memory_bytes else None
        self.metrics = ServerMetrics(self._metrics_state)
        #: where ``/metrics`` is served (``metrics_port``), once started
        self.metrics_port: int | None = None

    def _metrics_state(self) -> dict[str, object]:
        """What the metrics' gauges read at scrape time (from the HTTP thread)."""
        views = [
            SessionView(s.session_id, s.spec.name, s.point, s.memory_bytes)
            for s in list(self.stats.sessions.values())
            if s.spec is not None
        ]
        st = self.stats
        return {
            "train_steps": st.train_steps,
            "frames_received": st.frames_in,
            "frames_sent": st.frames_out,
            "bytes_received": st.bytes_in,
            "bytes_sent": st.bytes_out,
            "sessions_active": self.stats.sessions_active,
            "sessions_detached": self.stats.sessions_detached,
            "connections_unauthenticated": self.stats.unauthenticated,
            "memory_reserved_bytes": self.budget.reserved_bytes if self.budget else sum(v.memory_bytes for v in views),
            "sessions": views,
        }

    def _count(self, *, sessions: int = 0, unauthenticated: int = 0) -> None:
        self.stats.sessions_active += sessions
        self.stats.unauthenticated += unauthenticated
        if self.stats.sessions_active == 0 and self.stats.unauthenticated == 0:
            self._idle.set()
        else:
            self._idle.clear()

    async def wait_idle(self, timeout: float) -> None:
        """Return once no session has a connection open and no unauthenticated
        connection is waiting. Detached sessions (awaiting a resume) hold a slot
        but no connection: they do not count here (``stats.sessions_detached``).

        For a graceful drain before shutdown, and for tests that check a
        connection was released without polling. Raises ``TimeoutError`` after
        ``timeout``.
        """
        await asyncio.wait_for(self._idle.wait(), timeout)

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
        if self.config.token_in_clear:
            log.warning(
                "the token crosses the network in clear over ws:// on %s; serve with --tls-cert/--tls-key", self.config.host
            )
        cfg = self.config
        if cfg.metrics_port is not None:  # first: a port in use fails before any device can connect
            try:
                self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.host)
            except OSError as exc:
                raise OSError(exc.errno, f"metrics port {cfg.metrics_port}: {exc.strerror or exc}") from None
        self._server = await serve(
            self._handle,
            cfg.host,
            cfg.port,
            create_connection=_WholeMessageConnection,
            ssl=self._ssl_context(),
            # Features are already compressed; deflate costs 15x throughput (see issue 4).
            compression=None,
            # Small until a Hello is accepted (raised per connection then): frames that
            # arrive with the handshake are parsed at once, before _admit runs.
            max_size=cfg.max_hello_bytes,
            # Frames the library buffers before it stops reading the socket; with
            # the inbox this bounds what one connection holds in memory.
            max_queue=4,
            open_timeout=cfg.hello_timeout_s,
            # Keepalive is ours (`_keepalive`), per session: the library's would
            # time out on pongs queued behind frames we stopped reading on purpose.
            ping_interval=None,
        )
        loop = asyncio.get_running_loop()
        for sid in self._on_disk:
            self._expiry[sid] = loop.call_later(cfg.session_ttl_s, self._expire, sid)
        if self._on_disk:
            log.info(
                "%d session(s) in %s wait for their devices to resume (%g s)",
                len(self._on_disk),
                cfg.state_dir,
                cfg.session_ttl_s,
            )

    async def close(self) -> None:
        self._closing = True  # connections closing now detach without arming a TTL
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        await asyncio.to_thread(self.metrics.close)  # waits for the HTTP thread's poll (<= 0.5 s)

    async def __aenter__(self) -> CloudServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ connections
    async def _send(self, ws: ServerConnection, session_id: int, seq: itertools.count, frame: Frame) -> None:
        data = encode(Envelope(frame=frame, session=session_id, seq=next(seq), sent_ns=time.monotonic_ns()))
        await ws.send(data)
        self.stats.frames_out += 1
        self.stats.bytes_out += len(data)
        if isinstance(frame, Error):
            self.metrics.refused.labels(code=ErrorCode(frame.code).name).inc()

    async def _refuse(
        self, ws: ServerConnection, session_id: int, seq: itertools.count, code: ErrorCode, message: str, close_code: int
    ) -> None:
        log.info(
            "connection %d from %s refused: %s (%s)",
            session_id,
            _peer(ws),
            message,
            code.name,
            extra={"event": "refused", "connection": session_id, "peer": _peer(ws), "code": code.name},
        )
        try:
            await self._send(ws, session_id, seq, Error(code=code, message=message, step=-1))
            await ws.close(close_code, message[:120])
        except ConnectionClosed:
            pass

    async def _decode(self, ws: ServerConnection, session_id: int, seq: itertools.count, message: str | bytes) -> Envelope | None:
        """The decoded envelope, or None after answering an undecodable message with ``Error``."""
        self.stats.frames_in += 1
        self.stats.bytes_in += len(message)
        if isinstance(message, str):
            self.stats.bad_frames += 1
            await self._send(
                ws,
                session_id,
                seq,
                Error(
                    code=ErrorCode.MALFORMED, message="text messages are not part of the protocol; send binary frames", step=-1
                ),
            )
            return None
        try:
            return decode(message, self._limits)
        except WireError as exc:
            self.stats.bad_frames += 1
            await self._send(ws, session_id, seq, Error(code=exc.code, message=exc.message, step=-1))
            return None

    async def _handle(self, ws: ServerConnection) -> None:
        conn_id = next(self._ids)
        seq = itertools.count()
        try:
            session = await self._admit(ws, conn_id, seq)
        except (_Refused, ConnectionClosed):
            return
        sid = session.session_id
        self._attached[sid] = ws
        released = self._released[sid] = asyncio.Event()
        try:
            await self._serve_session(ws, session, seq)
        finally:
            self._attached.pop(sid, None)
            # Unless it said goodbye (Bye, or a normal close it started) or the server
            # ended it (idle, an error), a session may come back: the network dropped,
            # it stopped answering pings, or a slow link made a ping late.
            close = ws.protocol.close_rcvd
            goodbye = close is not None and close.code == 1000 and ws.protocol.close_rcvd_then_sent
            # (a resume taking over aborts the old socket: no goodbye, so it is kept)
            if session.phase is not Phase.CLOSED and not goodbye and self.config.session_ttl_s > 0:
                self._detach(session)
            else:
                self._free(session)
            released.set()

    def _sessions_held(self) -> int:
        """Slots taken: sessions with a connection, detached ones, and those found on
        disk at start-up whose devices may still come back."""
        return self.stats.sessions_active + self.stats.sessions_detached + len(self._on_disk)

    def _session_config(self) -> SessionConfig:
        cfg = self.config
        return SessionConfig(
            token=cfg.token,
            context_every=cfg.context_every,
            max_session_bytes=cfg.max_session_bytes,
            compute_slowdown=cfg.cloud_slowdown,
            resume_secret=self._secret,
            checkpoints=self.state is not None,
            memory_budget=self.budget,
        )

    def _free(self, session: CloudSession, *, attached: bool = True) -> None:
        sid = session.session_id
        self.stats.sessions.pop(sid, None)
        self._resuming.pop(sid, None)
        self._forget_on_disk(sid)
        self._released.pop(sid, None)
        self.stats.closed.append({"session": sid, "steps": session.applied_steps, "last_step": session.last_step})
        self._release_memory(session)
        self.metrics.sessions_closed.inc()
        log.info(
            "session %d closed after %d train steps",
            sid,
            session.applied_steps,
            extra={"event": "closed", "session": sid, "steps": session.applied_steps, "last_step": session.last_step},
        )
        if attached:
            self._count(sessions=-1)

    def _forget_on_disk(self, sid: int) -> None:
        """Delete a session's checkpoints, off the event loop (an rmtree of up to two)."""
        if self.state is not None:
            removal = asyncio.get_running_loop().run_in_executor(None, self.state.remove, sid)
            self._removals.add(removal)
            removal.add_done_callback(self._removals.discard)

    def _detach(self, session: CloudSession) -> None:
        """Keep a session whose connection dropped for ``session_ttl_s``; it still
        holds its slot (and its memory), not a connection."""
        sid = session.session_id
        ttl = self.config.session_ttl_s
        self.stats.sessions_detached += 1
        self._count(sessions=-1)
        if self._closing:  # the server is going down: the state dir (if any) keeps it
            return
        self._expiry[sid] = asyncio.get_running_loop().call_later(ttl, self._expire, sid)
        log.info(
            "session %d detached after step %d (connection lost); kept %g s for a resume",
            sid,
            session.last_step,
            ttl,
            extra={"event": "detached", "session": sid, "last_step": session.last_step},
        )

    def _expire(self, sid: int) -> None:
        self._expiry.pop(sid, None)
        session = self.stats.sessions.get(sid)
        if sid in self._on_disk:  # found on disk at start-up; no device came back for it
            self._on_disk.discard(sid)
            log.info("session %d (from the state dir) expired: no resume within %g s", sid, self.config.session_ttl_s)
            self._forget_on_disk(sid)
            return
        if session is None:
            return
        self.stats.sessions_detached -= 1
        log.info(
            "session %d expired: no resume within %g s",
            sid,
            self.config.session_ttl_s,
            extra={"event": "expired", "session": sid},
        )
        self._free(session, attached=False)

    async def _resume(self, ws: ServerConnection, conn_id: int, seq: itertools.count, hello: Hello) -> CloudSession:
        """Re-attach a device to its session (`CloudSession.resume` checks the tokens).
        If the old connection still looks alive here (the device saw the drop first:
        half-open TCP), a valid resume takes over from it. A session this process
        does not hold (the server restarted), or one whose device restarted from a
        checkpoint (``resume_restart``), is restored from the state dir at the
        device's checkpoint step: both sides roll back to it."""
        sid = hello.resume_session
        async with self._resuming.setdefault(sid, asyncio.Lock()):  # dropped when the session ends (`_free`)
            return await self._resume_locked(ws, conn_id, seq, hello)

    async def _resume_locked(self, ws: ServerConnection, conn_id: int, seq: itertools.count, hello: Hello) -> CloudSession:
        sid = hello.resume_session
        session = self.stats.sessions.get(sid)
        candidate = session
        if session is None or hello.resume_restart:
            candidate = await self._restore(ws, conn_id, seq, hello)
        assert candidate is not None
        try:
            await self._install(ws, conn_id, seq, hello, session, candidate)
        except BaseException:
            if candidate is not session:  # a restored session that never took over: its memory goes
                self._release_memory(candidate)
            raise
        self._count(sessions=1)
        try:
            # built now, after the old connection's last step finished: last_step is current
            (reply,) = candidate.resume(hello)
            if isinstance(reply, Error):
                await self._refuse(ws, conn_id, seq, reply.code, reply.message, 1008)
                raise _Refused
            await self._send(ws, sid, seq, reply)
        except BaseException:
            self._detach(candidate)  # dropped again at once: wait for the next resume, as before
            raise
        ws.protocol.max_message_size = self.config.max_frame_bytes  # only now: the tokens were right
        self.metrics.sessions_resumed.inc()
        log.info(
            "session %d: %s (from %s)",
            sid,
            reply.message,
            _peer(ws),
            extra={"event": "resumed", "session": sid, "peer": _peer(ws), "step": candidate.last_step},
        )
        return candidate

    async def _install(
        self,
        ws: ServerConnection,
        conn_id: int,
        seq: itertools.count,
        hello: Hello,
        session: CloudSession | None,
        candidate: CloudSession,
    ) -> None:
        """Make ``candidate`` (the live session, or one restored) the session of
        ``hello``'s id, or refuse and raise `_Refused`."""
        sid = hello.resume_session
        (reply,) = candidate.resume(hello)  # the tokens first: a wrong one touches nothing
        if isinstance(reply, Error):
            await self._refuse(ws, conn_id, seq, reply.code, reply.message, 1008)
            raise _Refused
        if session is not None:
            await self._take_over(ws, conn_id, seq, session)
            if candidate is not session:  # rolled back: the restored state replaces the live one
                self.stats.sessions[sid] = candidate
                self._release_memory(session)
            return
        # a session found on disk at start-up has its slot kept; another one needs a free slot
        if sid not in self._on_disk and self._sessions_held() >= self.config.max_sessions:
            await self._refuse(
                ws,
                conn_id,
                seq,
                ErrorCode.SERVER_BUSY,
                f"server is at its limit of {self.config.max_sessions} sessions",
                1013,
            )
            raise _Refused
        handle = self._expiry.pop(sid, None)
        if handle is not None:
            handle.cancel()
        self._on_disk.discard(sid)
        self.stats.sessions[sid] = candidate
        self.stats.sessions_total += 1

    def _release_memory(self, session: CloudSession) -> None:
        if self.budget is not None:
            self.budget.release(session.budget_key)

    async def _restore(self, ws: ServerConnection, conn_id: int, seq: itertools.count, hello: Hello) -> CloudSession:
        """The session of ``hello`` rebuilt from its checkpoint at ``hello.resume_step``."""
        sid = hello.resume_session
        config = self._session_config()
        try:
            CloudSession(sid, config).authenticate(hello)  # the server's token before any disk or model work
        except WireError as exc:
            await self._refuse(ws, conn_id, seq, exc.code, exc.message, 1008)
            raise _Refused from None
        if self.state is None or hello.resume_step < 0:
            await self._refuse(
                ws, conn_id, seq, ErrorCode.PROTOCOL, f"session {sid} is unknown or expired; start a new run", 1008
            )
            raise _Refused
        try:
            return await asyncio.to_thread(self.state.restore, sid, hello.resume_step, config, hello.resume_token)
        except WrongResumeToken as exc:
            await self._refuse(ws, conn_id, seq, ErrorCode.UNAUTHORIZED, f"{exc}; start a new run", 1008)
            raise _Refused from None
        except CheckpointError as exc:
            await self._refuse(ws, conn_id, seq, ErrorCode.PROTOCOL, f"{exc}; start a new run", 1008)
            raise _Refused from None

    async def _take_over(self, ws: ServerConnection, conn_id: int, seq: itertools.count, session: CloudSession) -> None:
        """Detach ``session`` from its old connection, if any, and stop its TTL."""
        sid = session.session_id
        old = self._attached.get(sid)
        if old is not None:
            log.info("session %d: the resume from %s takes over from the old connection", sid, _peer(ws))
            old.transport.abort()  # it would not answer a closing handshake
            try:
                await asyncio.wait_for(self._released[sid].wait(), 60)
            except TimeoutError:
                await self._refuse(ws, conn_id, seq, ErrorCode.SERVER_BUSY, f"session {sid} is still busy; try again", 1013)
                raise _Refused from None
        handle = self._expiry.pop(sid, None)
        if handle is None or self.stats.sessions.get(sid) is not session:
            await self._refuse(ws, conn_id, seq, ErrorCode.PROTOCOL, f"session {sid} ended meanwhile; start a new run", 1008)
            raise _Refused
        handle.cancel()
        self.stats.sessions_detached -= 1

    async def _admit(self, ws: ServerConnection, session_id: int, seq: itertools.count) -> CloudSession:
        """Wait for an acceptable Hello; return the session holding a slot, or raise `_Refused`."""
        cfg = self.config
        if self.stats.unauthenticated >= cfg.max_unauthenticated:
            await self._refuse(
                ws,
                session_id,
                seq,
                ErrorCode.SERVER_BUSY,
                f"server has {cfg.max_unauthenticated} connections waiting to say Hello",
                1013,
            )
            raise _Refused
        self._count(unauthenticated=1)
        try:
            ws.protocol.max_message_size = cfg.max_hello_bytes
            try:
                hello = await asyncio.wait_for(self._await_hello(ws, session_id, seq), cfg.hello_timeout_s)
            except TimeoutError:
                await self._refuse(ws, session_id, seq, ErrorCode.PROTOCOL, f"no Hello within {cfg.hello_timeout_s:g} s", 1008)
                raise _Refused from None
            if hello.resume_session:
                return await self._resume(ws, session_id, seq, hello)
            session = CloudSession(session_id, self._session_config())
            try:
                session.authenticate(hello)
            except WireError as exc:
                await self._refuse(ws, session_id, seq, exc.code, exc.message, 1008)
                raise _Refused from None
            if self._sessions_held() >= cfg.max_sessions:
                await self._refuse(
                    ws, session_id, seq, ErrorCode.SERVER_BUSY, f"server is at its limit of {cfg.max_sessions} sessions", 1013
                )
                raise _Refused
            self._count(sessions=1)  # reserved while the model is built
        finally:
            self._count(unauthenticated=-1)
        try:
            replies = await asyncio.to_thread(session.handle, hello)
            (reply,) = replies
            if not isinstance(reply, HelloAck):
                err = reply if isinstance(reply, Error) else Error(code=ErrorCode.INTERNAL, message="Hello not accepted", step=-1)
                busy = err.code == ErrorCode.SERVER_BUSY  # 1013: try again later
                await self._refuse(ws, session_id, seq, err.code, err.message, 1013 if busy else 1008)
                raise _Refused
            await self._send(ws, session_id, seq, reply)
        except BaseException:
            self._count(sessions=-1)
            self._release_memory(session)  # reserved at the Hello's memory check
            raise
        ws.protocol.max_message_size = cfg.max_frame_bytes
        self.stats.sessions_total += 1
        self.stats.sessions[session_id] = session
        self.metrics.sessions_opened.inc()
        assert session.hello is not None
        log.info(
            "session %d opened from %s: %s",
            session_id,
            _peer(ws),
            reply.message,
            extra={
                "event": "opened",
                "session": session_id,
                "peer": _peer(ws),
                "model": session.hello.model,
                "point": session.point,
                "memory_bytes": session.memory_bytes,
            },
        )
        return session

    async def _await_hello(self, ws: ServerConnection, session_id: int, seq: itertools.count) -> Hello:
        """Answer whatever comes before a Hello with ``Error``; return the Hello."""
        while True:
            envelope = await self._decode(ws, session_id, seq, await ws.recv())
            if envelope is None:
                continue
            if isinstance(envelope.frame, Hello):
                return envelope.frame
            await self._send(
                ws,
                session_id,
                seq,
                Error(code=ErrorCode.PROTOCOL, message=f"expected Hello first, got {type(envelope.frame).__name__}", step=-1),
            )

    async def _serve_session(self, ws: ServerConnection, session: CloudSession, seq: itertools.count) -> None:
        inbox: asyncio.Queue[tuple[Envelope, int] | None] = asyncio.Queue(maxsize=self.config.inbox_frames)
        worker = asyncio.create_task(self._work(ws, session, inbox, seq))
        reading = _ReadState()
        keepalive = asyncio.create_task(self._keepalive(ws, session.session_id, reading))
        try:
            while session.phase is not Phase.CLOSED and not worker.done():
                try:
                    message = await asyncio.wait_for(ws.recv(), self.config.idle_timeout_s)
                except TimeoutError:
                    log.info("session %d idle for %g s; closing", session.session_id, self.config.idle_timeout_s)
                    session.phase = Phase.CLOSED  # ended by policy: not kept for a resume
                    await self._refuse(
                        ws,
                        session.session_id,
                        seq,
                        ErrorCode.PROTOCOL,
                        f"no frame for {self.config.idle_timeout_s:g} s; session closed",
                        1001,
                    )
                    break
                recv_ns = time.monotonic_ns()
                envelope = await self._decode(ws, session.session_id, seq, message)
                if envelope is not None:
                    # Blocks while the inbox is full: the socket is not read meanwhile.
                    if inbox.full():
                        reading.paused = reading.paused_since_ping = True
                    await self._put_unless_done(inbox, (envelope, recv_ns), worker)
                    reading.paused = False
        except ConnectionClosed:
            pass
        finally:
            keepalive.cancel()
            # Work queued by a peer that is gone is dropped, not computed.
            while not inbox.empty():
                inbox.get_nowait()
            inbox.put_nowait(None)
            try:
                await worker
            except Exception:
                log.exception("session %d: worker failed", session.session_id)

    async def _keepalive(self, ws: ServerConnection, session_id: int, reading: _ReadState) -> None:
        """Ping every ``ping_interval_s``; close a peer whose pong does not come in ``ping_timeout_s``.

        A pong queues behind whatever the peer sent before it, so one that is late
        while this server was not reading (its inbox full: backpressure) proves
        nothing and is forgiven. A pong late while the server *was* reading means a
        dead peer or a frame trickled byte by byte: the session is closed.
        """
        cfg = self.config
        try:
            while True:
                await asyncio.sleep(cfg.ping_interval_s)
                reading.paused_since_ping = reading.paused
                pong = await ws.ping()
                try:
                    await asyncio.wait_for(pong, cfg.ping_timeout_s)
                except TimeoutError:
                    if reading.paused or reading.paused_since_ping:
                        continue
                    log.info("session %d: no pong within %g s; closing", session_id, cfg.ping_timeout_s)
                    # No closing handshake with a peer that does not answer (or is
                    # mid-way through a trickled frame, so its reply would be payload).
                    try:
                        await asyncio.wait_for(ws.close(1011, "keepalive ping timeout"), cfg.ping_timeout_s)
                    except TimeoutError:
                        ws.transport.abort()
                    return
        except ConnectionClosed:
            return

    @staticmethod
    async def _put_unless_done(inbox: asyncio.Queue, item: object, worker: asyncio.Task) -> None:
        put = asyncio.ensure_future(inbox.put(item))
        await asyncio.wait({put, worker}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()

    @staticmethod
    async def _emulate_slower_compute(session: CloudSession, replies: list[Frame]) -> None:
        """With ``compute_slowdown`` s > 1 the session reported s x its step time;
        wait the part it did not spend, as the slower cloud would have."""
        s = session.config.compute_slowdown
        if s > 1.0:
            for reply in replies:
                if isinstance(reply, Gradients):
                    await asyncio.sleep(reply.cloud_ms * (1.0 - 1.0 / s) / 1e3)

    async def _save_checkpoint(self, session: CloudSession, replies: list[Frame]) -> list[Frame]:
        """Write the checkpoint the session asked for, before its ack goes out; a
        failed write (disk full) turns the ack into ``saved=False`` with the reason."""
        assert session.pending_checkpoint is not None and self.state is not None
        (step, tensors, manifest), session.pending_checkpoint = session.pending_checkpoint, None
        try:
            saved = await asyncio.to_thread(self.state.save, session.session_id, step, tensors, manifest)
        except Exception as exc:  # noqa: BLE001 - disk full, a bad path: the device hears why, training goes on
            log.warning("session %d: checkpoint of step %d not written: %s", session.session_id, step, exc)
            return [
                CheckpointAck(step=step, saved=False, message=f"the cloud could not write its checkpoint: {exc}")
                if isinstance(r, CheckpointAck)
                else r
                for r in replies
            ]
        log.debug("session %d: checkpoint of step %d, %d bytes in %.3f s", session.session_id, step, saved.nbytes, saved.seconds)
        return replies

    async def _work(self, ws: ServerConnection, session: CloudSession, inbox: asyncio.Queue, seq: itertools.count) -> None:
        """Apply frames in arrival order, one at a time, off the event loop."""
        while True:
            item = await inbox.get()
            if item is None:
                return
            envelope, recv_ns = item
            session.queue_depth = inbox.qsize()
            steps, point, t0 = session.applied_steps, session.point, time.perf_counter()
            replies = await asyncio.to_thread(session.handle, envelope.frame, recv_ns=recv_ns)
            await self._emulate_slower_compute(session, replies)
            if session.applied_steps != steps:
                self.stats.train_steps += session.applied_steps - steps
                if isinstance(envelope.frame, Features):
                    self.metrics.step_seconds.observe(time.perf_counter() - t0)
            if session.point != point:
                log.info(
                    "session %d repartitioned at step %d: cut %d -> %d",
                    session.session_id,
                    session.last_step,
                    point,
                    session.point,
                    extra={"event": "repartitioned", "session": session.session_id, "from": point, "to": session.point},
                )
            if session.pending_checkpoint is not None:
                replies = await self._save_checkpoint(session, replies)
            try:
                for reply in replies:
                    await self._send(ws, session.session_id, seq, reply)
                if session.phase is Phase.CLOSED:
                    internal = any(isinstance(r, Error) and r.code == ErrorCode.INTERNAL for r in replies)
                    await ws.close(1011 if internal else 1000, "internal error" if internal else "bye")
                    return
            except ConnectionClosed:
                return
