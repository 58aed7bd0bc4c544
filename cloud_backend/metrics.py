"""What an operator sees of a running server: Prometheus metrics (``serve --metrics-port``).

What the server already counts (`ServerStats`: frames, bytes, train steps) and
what is a *state* (sessions active or detached, memory per session) is read from
the server at scrape time by a collector, so no figure is kept twice and none
can drift from what the server holds; the counters only metrics need (sessions
opened/resumed/closed, refusals by code) and the step latency histogram are
bumped by the asyncio layer as things happen. Each server owns its registry: several
servers in one process (the tests) do not share numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: cloud step latency buckets (s): a light tail computes in ~1 ms, MobileNetV3's in ~100 ms,
#: and a loaded server queues steps behind each other
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class SessionView:
    """What the collector reports of one session (read at scrape time)."""

    session_id: int
    model: str
    point: int
    memory_bytes: int


class _StateCollector(Collector):
    """Gauges read from the server when Prometheus scrapes."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        for name, doc in (
            ("sessions_active", "device sessions with an open connection"),
            ("sessions_detached", "sessions whose connection dropped, kept for their device to resume"),
            ("connections_unauthenticated", "connections that have not (yet) had a Hello accepted"),
            ("memory_reserved_bytes", "memory the held sessions' estimates add up to (what --max-memory bounds)"),
        ):
            yield GaugeMetricFamily(f"splitreplay_{name}", doc, value=float(state[name]))
        for name, doc in (
            ("train_steps", "train steps applied, all sessions (rate() = steps/s)"),
            ("frames_received", "frames received"),
            ("frames_sent", "frames sent"),
            ("bytes_received", "bytes of frames received"),
            ("bytes_sent", "bytes of frames sent"),
        ):
            yield CounterMetricFamily(f"splitreplay_{name}", doc, value=float(state[name]))
        memory = GaugeMetricFamily(
            "splitreplay_session_memory_bytes",
            "estimated memory of one session: tail weights, optimizer, reply cache, activations",
            labels=["session", "model", "point"],
        )
        for s in state["sessions"]:
            memory.add_metric([str(s.session_id), s.model, str(s.point)], float(s.memory_bytes))
        yield memory


class ServerMetrics:
    """The server's counters and histogram, and the HTTP endpoint that serves them."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_opened = Counter("splitreplay_sessions_opened", "sessions accepted (new ones, not resumes)", registry=r)
        self.sessions_resumed = Counter("splitreplay_sessions_resumed", "sessions a device re-attached to", registry=r)
        self.sessions_closed = Counter(
            "splitreplay_sessions_closed", "sessions ended (said goodbye, expired, or ended by the server)", registry=r
        )
        self.refused = Counter(
            "splitreplay_frames_refused",
            "Error frames sent to devices, by error code (malformed frames, refused Hellos, limits, a busy server)",
            ["code"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "splitreplay_step_seconds",
            "cloud time of one train step, from the frame's turn in its session's queue to its replies (s)",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        r.register(_StateCollector(state))
        self._http: Any = None

    def serve(self, port: int, host: str) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0: any free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
