"""Link models for desktop emulation: named profiles and time-varying traces.

The shaping proxy (:mod:`edge_sdk.emulation.proxy`) asks its network *what the link
looks like at time t* for every chunk it puts on the wire. Both a fixed
:class:`LinkProfile` and a :class:`NetworkTrace` answer that through the same
``at(t)`` method, so the proxy never needs to know which one it has.

Bandwidths are *goodput* (payload bits per second, as speed tests report), not
PHY rates; latencies are one-way propagation + queueing delays between the device
and the cloud region. The named profiles are representative values drawn from the
published measurements cited next to each one, rounded; real links vary a lot
around them (time of day, signal, operator, country). Treat them as plausible
operating points for experiments, not as predictions for any particular network.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MBIT = 1_000_000

__all__ = [
    "PROFILES",
    "TRACES_DIR",
    "LinkProfile",
    "Network",
    "NetworkTrace",
    "TraceFormatError",
    "network_choices",
    "parse_network",
]


@dataclass(frozen=True)
class LinkProfile:
    """A fixed link: rate and one-way delay per direction.

    ``uplink`` is device -> cloud, ``downlink`` is cloud -> device. ``source`` says
    where the figures come from, so a reader of a benchmark JSON can judge them.
    """

    name: str
    uplink_bps: float
    downlink_bps: float
    one_way_latency_up_s: float
    one_way_latency_down_s: float
    source: str = ""

    def __post_init__(self) -> None:
        for field in ("uplink_bps", "downlink_bps"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"LinkProfile {self.name!r}: {field} must be a finite number > 0, got {value!r}")
        for field in ("one_way_latency_up_s", "one_way_latency_down_s"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"LinkProfile {self.name!r}: {field} must be a finite number >= 0, got {value!r}")

    @property
    def rtt_s(self) -> float:
        """Round-trip propagation delay (no serialization)."""
        return self.one_way_latency_up_s + self.one_way_latency_down_s

    def at(self, t: float) -> LinkProfile:
        """A fixed profile looks the same at every time (same interface as a trace)."""
        return self

    def describe(self) -> str:
        return (
            f"{self.name}: up {self.uplink_bps / MBIT:g} Mbit/s, down {self.downlink_bps / MBIT:g} Mbit/s, "
            f"one-way latency up {self.one_way_latency_up_s * 1e3:g} ms / down {self.one_way_latency_down_s * 1e3:g} ms"
        )


def _profile(name: str, up_mbps: float, down_mbps: float, rtt_ms: float, source: str) -> LinkProfile:
    """Build a profile from the units measurement reports use (Mbit/s, RTT in ms)."""
    return LinkProfile(
        name=name,
        uplink_bps=up_mbps * MBIT,
        downlink_bps=down_mbps * MBIT,
        one_way_latency_up_s=rtt_ms / 2e3,
        one_way_latency_down_s=rtt_ms / 2e3,
        source=source,
    )


# Representative operating points. The cited reports give medians/averages over
# many users; we round them and add a few ms of latency because the training
# server sits in a cloud region, not at the nearby speed-test server.
PROFILES: dict[str, LinkProfile] = {
    # Home WiFi (802.11ac/ax) behind fixed broadband. Ookla Speedtest Global Index,
    # fixed broadband, global medians in 2024: roughly 90 Mbit/s down, 40 Mbit/s up,
    # ~10 ms idle latency to a nearby test server; +10 ms to reach a cloud region.
    "wifi": _profile(
        "wifi",
        up_mbps=40,
        down_mbps=90,
        rtt_ms=20,
        source="Ookla Speedtest Global Index 2024, fixed broadband global medians (~90/40 Mbit/s, ~10 ms "
        "to nearby server); RTT raised to 20 ms for a cloud region. Representative, rounded.",
    ),
    # 5G (mostly non-standalone, mid-band). Opensignal 5G experience reports
    # (2023-2024): 5G download averages ~100-300 Mbit/s by country, upload ~15-40
    # Mbit/s; measured 5G latency ~25-40 ms RTT. 3GPP TR 38.913 targets 4 ms
    # user-plane latency for eMBB, which is the radio leg only.
    "5g": _profile(
        "5g",
        up_mbps=20,
        down_mbps=150,
        rtt_ms=30,
        source="Opensignal 5G experience reports 2023-24 (5G down ~100-300, up ~15-40 Mbit/s, "
        "RTT ~25-40 ms); 3GPP TR 38.913 eMBB 4 ms user-plane target is the radio leg only. Representative.",
    ),
    # 4G LTE. Opensignal / Ookla mobile reports: LTE download ~20-40 Mbit/s,
    # upload ~5-10 Mbit/s, latency ~40-60 ms RTT in most markets.
    "4g": _profile(
        "4g",
        up_mbps=8,
        down_mbps=30,
        rtt_ms=50,
        source="Opensignal and Ookla mobile network reports (LTE down ~20-40, up ~5-10 Mbit/s, "
        "RTT ~40-60 ms). Representative, rounded.",
    ),
    # Household IoT radio: IEEE 802.15.4 (Zigbee/Thread) at 2.4 GHz has a 250 kbit/s
    # PHY rate (IEEE 802.15.4-2006, O-QPSK); Bluetooth LE 4.x/5 typically delivers
    # ~0.1-0.8 Mbit/s of application throughput (1M/2M PHY, Bluetooth SIG); a
    # congested 2.4 GHz WiFi link can drop to the same order. We take 250 kbit/s
    # each way and 100 ms RTT (radio hop + gateway + broadband to the cloud).
    "iot": _profile(
        "iot",
        up_mbps=0.25,
        down_mbps=0.25,
        rtt_ms=100,
        source="IEEE 802.15.4-2006 2.4 GHz PHY rate 250 kbit/s; BLE 4.x/5 application throughput "
        "~0.1-0.8 Mbit/s (Bluetooth SIG); RTT 100 ms via gateway to cloud. Representative upper bound "
        "for 802.15.4, typical for BLE.",
    ),
}

TRACES_DIR = Path(__file__).resolve().parent / "traces"


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class _TraceRow:
    time_s: float
    profile: LinkProfile


class NetworkTrace:
    """A piecewise-constant link schedule: each row holds until the next row's time.

    CSV rows are ``time_s,up_mbps,down_mbps,rtt_ms`` after one header line; blank
    lines and lines starting with ``#`` are ignored. The first row must be at time
    0 and times must strictly increase; after the last row its values hold
    forever. The RTT is split evenly into the two one-way latencies (a trace of
    RTTs cannot tell the directions apart). Time ``t`` is seconds since the proxy
    started, so the same file replays the same schedule on every run.
    """

    HEADER = ("time_s", "up_mbps", "down_mbps", "rtt_ms")

    def __init__(self, rows: list[tuple[float, float, float, float]], name: str = "trace", source: str = "") -> None:
        if not rows:
            raise ValueError(f"trace {name!r} has no rows")
        self.name = name
        self.source = source
        self._rows: list[_TraceRow] = []
        for time_s, up, down, rtt in rows:
            profile = _profile(f"{name}@{time_s:g}s", up_mbps=up, down_mbps=down, rtt_ms=rtt, source=source)
            self._rows.append(_TraceRow(float(time_s), profile))
        self._times = [r.time_s for r in self._rows]
        if self._times[0] != 0:
            raise ValueError(f"trace {name!r}: first row must be at time 0, got {self._times[0]:g}")
        if any(b <= a for a, b in zip(self._times, self._times[1:])):
            raise ValueError(f"trace {name!r}: times must strictly increase")

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str]) -> NetworkTrace:
        """Read a trace file; every problem is reported as ``file:line: what``."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TraceFormatError(f"{path}: trace file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TraceFormatError(f"{path}: cannot read trace file: {exc}") from None
        return cls.from_text(text, name=path.stem, origin=str(path))

    @classmethod
    def from_text(cls, text: str, name: str = "trace", origin: str = "<trace>") -> NetworkTrace:
        rows: list[tuple[float, float, float, float]] = []
        header_seen = False
        last_time: float | None = None
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = [f.strip() for f in line.split(",")]
            where = f"{origin}:{lineno}"
            if not header_seen:
                if tuple(f.lower() for f in fields) != cls.HEADER:
                    raise TraceFormatError(f"{where}: expected header line {','.join(cls.HEADER)!r}, got {line!r}")
                header_seen = True
                continue
            if len(fields) != 4:
                raise TraceFormatError(
                    f"{where}: expected 4 comma-separated values (time_s,up_mbps,down_mbps,rtt_ms), got {len(fields)}: {line!r}"
                )
            values: list[float] = []
            for col, field in zip(cls.HEADER, fields):
                try:
                    value = float(field)
                except ValueError:
                    raise TraceFormatError(f"{where}: {col} is not a number: {field!r}") from None
                if not math.isfinite(value):
                    raise TraceFormatError(f"{where}: {col} must be finite, got {field!r}")
                values.append(value)
            time_s, up, down, rtt = values
            if time_s < 0:
                raise TraceFormatError(f"{where}: time_s must be >= 0, got {time_s:g}")
            if last_time is None and time_s != 0:
                raise TraceFormatError(f"{where}: the first row must be at time_s 0, got {time_s:g}")
            if last_time is not None and time_s <= last_time:
                raise TraceFormatError(f"{where}: time_s must strictly increase ({time_s:g} after {last_time:g})")
            if up <= 0 or down <= 0:
                raise TraceFormatError(
                    f"{where}: up_mbps and down_mbps must be > 0 (an outage is not modelled), got {up:g}, {down:g}"
                )
            if rtt < 0:
                raise TraceFormatError(f"{where}: rtt_ms must be >= 0, got {rtt:g}")
            last_time = time_s
            rows.append((time_s, up, down, rtt))
        if not header_seen:
            raise TraceFormatError(f"{origin}: empty trace (expected header {','.join(cls.HEADER)!r} and at least one row)")
        if not rows:
            raise TraceFormatError(f"{origin}: trace has a header but no rows")
        return cls(rows, name=name, source=f"trace file {origin}")

    def at(self, t: float) -> LinkProfile:
        """Settings in force at ``t`` seconds after the start (before 0: the first row)."""
        i = bisect.bisect_right(self._times, t) - 1
        return self._rows[max(i, 0)].profile

    @property
    def duration_s(self) -> float:
        """Time of the last change; the last row holds after it."""
        return self._times[-1]

    def rows(self) -> list[tuple[float, LinkProfile]]:
        return [(r.time_s, r.profile) for r in self._rows]

    def describe(self) -> str:
        return f"trace {self.name}: {len(self._rows)} rows over {self.duration_s:g} s"

    def __repr__(self) -> str:
        return f"NetworkTrace(name={self.name!r}, rows={len(self._rows)})"


class Network(Protocol):
    """What the proxy needs: the link settings in force at time t (seconds since start)."""

    name: str

    def at(self, t: float) -> LinkProfile: ...


NetworkSpec = LinkProfile | NetworkTrace | None


def network_choices() -> str:
    return ", ".join([*PROFILES, "trace:PATH", "none"])


def parse_network(spec: str) -> NetworkSpec:
    """Turn a ``--network`` value into a profile, a trace or ``None`` (unshaped).

    ``trace:NAME`` also finds files shipped in :data:`TRACES_DIR` (with or without
    ``.csv``), so ``trace:wifi_to_iot`` works from any directory.
    """
    text = spec.strip()
    key = text.lower()
    if key in PROFILES:
        return PROFILES[key]
    if key == "none":
        return None
    if key.startswith("trace:"):
        path_text = text[len("trace:") :].strip()
        if not path_text:
            raise ValueError("--network trace: needs a file, e.g. trace:wifi_to_iot.csv")
        path = Path(path_text).expanduser()
        if not path.exists():
            for candidate in (TRACES_DIR / path_text, TRACES_DIR / f"{path_text}.csv"):
                if candidate.is_file():
                    path = candidate
                    break
            else:
                shipped = ", ".join(sorted(p.name for p in TRACES_DIR.glob("*.csv"))) or "none"
                raise TraceFormatError(f"{path}: trace file not found (shipped traces: {shipped})")
        return NetworkTrace.from_csv(path)
    raise ValueError(f"unknown network {spec!r}; choose one of: {network_choices()}")
