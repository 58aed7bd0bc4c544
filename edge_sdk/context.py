"""Context estimation: RTT, bandwidth per direction, compute time. Sans-I/O.

The estimators take timestamps (nanoseconds from monotonic clocks) and sizes and
never read a clock or a socket themselves, so the client, the cloud session and
the tests feed them the same way; the tests replay synthetic links with known
bandwidth, latency, clock offset and noise.

Clocks: the device and the cloud each stamp with their own monotonic clock. The
two differ by an unknown constant offset (seconds, or days), and both are noisy
(an event loop reads a frame some time after it arrived). So:

* RTT uses one clock only (request sent and response received on the device).
* Bandwidth uses (sender's sent_ns, receiver's recv_ns, nbytes) per frame. The
  one-way delay ``d = recv - sent = offset + latency + queueing + nbytes*8/bw``
  contains the offset, but the offset is the same for every frame, so only
  *differences* of delays are used, never a delay itself. See
  :class:`BandwidthEstimator` for the two methods and which one wins when.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

NS = 1_000_000_000


# --------------------------------------------------------------------------- RTT


class RttEstimator:
    """Round-trip time from request/response pairs stamped by one clock.

    Reports the windowed minimum (the base RTT, as BBR's min_rtt): queueing
    behind a big frame and a late event loop only ever *add* delay, so the
    minimum of recent samples is the propagation RTT, and one wild sample cannot
    move it. The window is a count of recent samples so that a real RTT increase
    (a route change, a new network) shows up once the old minimum ages out.
    ``srtt_s`` is the RFC 6298 smoothed mean (samples clipped at 4x the base),
    for logging how much queueing the link adds.
    """

    def __init__(self, window: int = 16, alpha: float = 0.125) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._samples: deque[int] = deque(maxlen=window)
        self.alpha = alpha
        self.count = 0
        self._srtt_ns: float | None = None

    def observe(self, sent_ns: int, recv_ns: int, remote_hold_ns: int = 0) -> None:
        """One exchange: request sent at ``sent_ns``, response received at ``recv_ns``
        (same clock); ``remote_hold_ns`` is how long the peer held the request
        (its processing time, if it reports one), subtracted."""
        sample = recv_ns - sent_ns - remote_hold_ns
        if sample <= 0:
            return  # impossible with one monotonic clock: a caller bug or a bad hold time
        self._samples.append(sample)
        self.count += 1
        base = min(self._samples)
        clipped = min(sample, 4 * base)
        self._srtt_ns = clipped if self._srtt_ns is None else (1 - self.alpha) * self._srtt_ns + self.alpha * clipped

    @property
    def rtt_s(self) -> float | None:
        """Base RTT in seconds; None before the first sample."""
        return min(self._samples) / NS if self._samples else None

    @property
    def srtt_s(self) -> float | None:
        return self._srtt_ns / NS if self._srtt_ns is not None else None


# --------------------------------------------------------------------------- bandwidth


@dataclass(frozen=True)
class FrameObservation:
    """One frame crossing the link: sender clock, receiver clock, payload bytes."""

    sent_ns: int
    recv_ns: int
    nbytes: int


class BandwidthEstimator:
    """Bandwidth of one direction, robust to the clock offset between the ends.

    Model: the link serializes frames FIFO at ``bw`` and delivers them after a
    propagation delay, so in the receiver's clock a frame starts serializing at
    ``max(sent + offset, end of the previous frame)``. Two estimators follow:

    **Packet train** (receiver clock only): frames queued back to back leave the
    link ``n*8/bw`` apart, so within a run of queued frames the receive time
    grows linearly with the bytes received, slope ``8/bw``, offset-free. Frame *i*
    was certainly queued when ``recv_{i-1} - sent_i > D + guard``, with ``D`` the
    smallest one-way delay in the window (every frame's delay is at least
    ``offset + latency``; the offset cancels because both sides contain it).
    A busy receiver reads late, and reads everything that arrived meanwhile at
    once, which squeezes gaps to zero and stretches others; but a late read only
    ever *adds* time. So the estimate is the lower envelope: per run, the lower
    convex hull of (cumulative bytes, receive time), and the byte-weighted median
    slope of its edges (late points lie above the hull; a late run end makes one
    short steep edge that the median ignores). Frames read less than
    ``squeeze_ns`` after their predecessor were read in one batch with it: their
    bytes count, their timestamps (read times, not arrival times) do not.

    The train is trusted only when at least half of the recent large frames
    queued, i.e. the link is saturated. On an idle link the only "queued" pairs
    are ones where a late read of the previous frame fooled the test.

    **Delay fit** (lower envelope in delay): for frames that were not queued,
    ``d = c + n*8/bw`` with constant ``c = offset + latency``. Bucket frames by
    size (log-spaced), take the minimum delay per bucket (queueing and late
    reads only add), and fit a line through the bucket minima: the slope is
    ``8/bw``, the intercept ``c``. Frames certainly queued, and frames that
    arrived within ``gap_tol_ns`` of their predecessor (a small control frame
    stuck behind a feature frame looks exactly like that), are left out. Needs
    frames of clearly different sizes (the protocol's small control frames next
    to feature/gradient frames); with one size only there is no slope and the
    fit says None instead of guessing.

    Which wins: the train when it is trusted, else the fit, else None. A
    saturated link is the case where the number matters most (the link is the
    bottleneck); there the fit lacks un-queued large frames, and the train
    follows a bandwidth drop within about ``train_window / 2`` frames, while the
    fit's old minima would hold the old value until they age out of the window.
    On an idle link the fit is exact up to the timestamp noise.

    Known blind spot (for whoever schedules control frames): on a busy but not
    saturated link, a control frame that is *always* sent while a feature frame
    is still serializing is indistinguishable, from timestamps alone, from an
    un-queued frame on a faster link. Frames arriving within ``gap_tol_ns`` of
    their predecessor are dropped for this reason, which usually leaves None;
    but send Context/ping frames when the direction is idle (e.g. the cloud's
    Context *before* its Gradients) so the fit has honest small frames.
    """

    def __init__(
        self,
        window: int = 48,
        bucket_ratio: float = 1.5,
        min_size_ratio: float = 4.0,
        train_window: int = 24,
        min_train_frames: int = 4,
        train_min_bytes: int = 2048,
        guard_ns: int = 500_000,
        gap_tol_ns: int = 5_000_000,
        squeeze_ns: int = 300_000,
    ) -> None:
        #: (observation, certainly queued, gap since the previous arrival or None)
        self._obs: deque[tuple[FrameObservation, bool, int | None]] = deque(maxlen=window)
        self.window = window
        self.bucket_ratio = bucket_ratio
        self.min_size_ratio = min_size_ratio
        self.train_window = train_window
        self.min_train_frames = min_train_frames
        self.train_min_bytes = train_min_bytes
        self.guard_ns = guard_ns
        self.gap_tol_ns = gap_tol_ns
        self.squeeze_ns = squeeze_ns
        self.count = 0

    # -- feeding ------------------------------------------------------------

    def observe(self, sent_ns: int, recv_ns: int, nbytes: int) -> None:
        """One received frame. Call in arrival order (the receiver's order)."""
        if nbytes <= 0:
            return
        ob = FrameObservation(int(sent_ns), int(recv_ns), int(nbytes))
        prev = self._obs[-1][0] if self._obs else None
        d = ob.recv_ns - ob.sent_ns
        floor = min(d, self._floor()) if self._obs else d
        queued = prev is not None and prev.recv_ns - ob.sent_ns > floor + self.guard_ns
        gap = ob.recv_ns - prev.recv_ns if prev is not None else None
        self._obs.append((ob, queued, gap))
        self.count += 1

    def _floor(self) -> int:
        """Smallest one-way delay in the window: >= offset + latency, so a frame sent
        more than this before its predecessor arrived certainly queued behind it.
        Windowed, so that a latency increase is not judged by an old minimum for long."""
        return min(o.recv_ns - o.sent_ns for o, _, _ in self._obs)

    def reset(self) -> None:
        """Forget everything (e.g. the device changed networks)."""
        self._obs.clear()
        self.count = 0

    # -- estimates ----------------------------------------------------------

    def train_bps(self) -> float | None:
        """Packet-train estimate (bits/s); None unless the link looks saturated."""
        recent = list(self._obs)[-self.train_window :]
        large = [q for o, q, _ in recent if o.nbytes >= self.train_min_bytes]
        n_queued = sum(large)
        if n_queued < self.min_train_frames or 2 * n_queued < len(large):
            return None
        edges: list[tuple[float, int]] = []  # (slope ns/byte, bytes spanned)
        run: list[tuple[int, int]] = []
        cum, in_run = 0, False
        for o, q, gap in recent:
            if q and in_run:
                cum += o.nbytes  # x: bytes that left the link since the run's first frame
            else:
                edges += _hull_edges(run)
                run, cum, in_run = [], 0, True
            if gap is None or gap >= self.squeeze_ns:
                run.append((cum, o.recv_ns))
            # else: read in one batch with its predecessor, so its time is a read time,
            # not an arrival time; its bytes still count toward the next point.
        edges += _hull_edges(run)
        edges = [(sl, w) for sl, w in edges if sl > 0]
        if not edges:
            return None
        return 8 * NS / _weighted_median(edges)

    def _fit(self) -> tuple[float, float] | None:
        """(slope ns/byte, intercept ns) of the lower envelope of delay vs size."""
        if len(self._obs) < 2:
            return None
        ref = self._obs[0][0].recv_ns - self._obs[0][0].sent_ns  # keep floats small: offsets are huge
        buckets: dict[int, tuple[int, int]] = {}  # bucket -> (delay, nbytes) of its fastest frame
        log_r = math.log(self.bucket_ratio)
        for ob, queued, gap in self._obs:
            if queued or (gap is not None and gap < self.gap_tol_ns):
                continue  # its delay (may) include waiting for the previous frame
            d = ob.recv_ns - ob.sent_ns - ref
            k = int(math.floor(math.log(ob.nbytes) / log_r))
            if k not in buckets or d < buckets[k][0]:
                buckets[k] = (d, ob.nbytes)
        if len(buckets) < 2:
            return None
        pts = sorted((n, d) for d, n in buckets.values())
        if pts[-1][0] < self.min_size_ratio * pts[0][0]:
            return None
        # least squares over the bucket minima
        mx = sum(n for n, _ in pts) / len(pts)
        my = sum(d for _, d in pts) / len(pts)
        sxx = sum((n - mx) ** 2 for n, _ in pts)
        sxy = sum((n - mx) * (d - my) for n, d in pts)
        if sxx <= 0:
            return None
        slope = sxy / sxx
        if slope <= 0:
            return None  # noise bigger than the transmission times: no answer beats a wrong one
        return slope, my - slope * mx + ref

    def fit_bps(self) -> float | None:
        """Lower-envelope delay-fit estimate (bits/s) or None without two sizes."""
        fit = self._fit()
        return 8 * NS / fit[0] if fit else None

    @property
    def base_delay_ns(self) -> float | None:
        """Intercept ``offset + latency`` of the fit (mixed clocks, meaningful only
        summed with the other direction's: up + down = propagation RTT)."""
        fit = self._fit()
        return fit[1] if fit else None

    @property
    def method(self) -> str | None:
        if self.train_bps() is not None:
            return "train"
        if self._fit() is not None:
            return "fit"
        return None

    @property
    def bps(self) -> float | None:
        """Best current estimate in bits per second; None when unknown."""
        t = self.train_bps()
        return t if t is not None else self.fit_bps()


# --------------------------------------------------------------------------- compute


def _hull_edges(points: list[tuple[int, int]]) -> list[tuple[float, int]]:
    """Edges (slope, x-extent) of the lower convex hull of points sorted by x."""
    hull: list[tuple[int, int]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord to p
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        if hull and p[0] == hull[-1][0]:
            continue
        hull.append(p)
    return [((y2 - y1) / (x2 - x1), x2 - x1) for (x1, y1), (x2, y2) in zip(hull, hull[1:])]


def _weighted_median(pairs: list[tuple[float, int]]) -> float:
    pairs = sorted(pairs)
    half = sum(w for _, w in pairs) / 2
    acc = 0
    for v, w in pairs:
        acc += w
        if acc >= half:
            return v
    return pairs[-1][0]


class ComputeEstimator:
    """Smoothed compute time (ms) with outlier rejection and level-shift detection.

    A GC pause, a first-call warm-up or a page fault makes one step 10x slower;
    an EWMA would carry that for many steps. Samples further than
    ``reject_factor`` from the median of recent accepted samples are dropped,
    unless ``shift_after`` of them arrive in a row: then the level really moved
    (a loaded cloud, a throttled phone) and the estimate jumps to their median.
    The first ``warmup`` samples are summarized by their median (no EWMA yet),
    so a slow first step does not anchor it.
    """

    def __init__(
        self, alpha: float = 0.2, window: int = 15, reject_factor: float = 3.0, shift_after: int = 3, warmup: int = 3
    ) -> None:
        self.alpha = alpha
        self.reject_factor = reject_factor
        self.shift_after = shift_after
        self.warmup = warmup
        self._recent: deque[float] = deque(maxlen=window)
        self._rejected: list[float] = []
        self._ewma: float | None = None
        self.count = 0
        self.rejected = 0

    def observe(self, ms: float) -> bool:
        """Add one sample; returns whether it was accepted."""
        if not math.isfinite(ms) or ms < 0:
            return False
        self.count += 1
        if len(self._recent) < self.warmup:
            self._recent.append(ms)
            if len(self._recent) == self.warmup:
                self._ewma = statistics.median(self._recent)
            return True
        med = statistics.median(self._recent)
        if med > 0 and not (med / self.reject_factor <= ms <= med * self.reject_factor):
            self._rejected.append(ms)
            self.rejected += 1
            if len(self._rejected) >= self.shift_after:
                level = statistics.median(self._rejected)
                self._recent.clear()
                self._recent.extend(self._rejected)
                self._rejected = []
                self._ewma = level
            return False
        self._rejected = []
        self._recent.append(ms)
        assert self._ewma is not None
        self._ewma = (1 - self.alpha) * self._ewma + self.alpha * ms
        return True

    @property
    def value_ms(self) -> float | None:
        if self._ewma is not None:
            return self._ewma
        return statistics.median(self._recent) if self._recent else None


# --------------------------------------------------------------------------- bundle


@dataclass(frozen=True)
class ContextSnapshot:
    """What the device (or the cloud) currently believes; None = not known yet.

    Duck-typed input of ``edge_sdk.decision.cost_model.apply_context`` and the
    content of a ``Context`` frame.
    """

    uplink_bps: float | None = None
    downlink_bps: float | None = None
    rtt_s: float | None = None
    edge_step_ms: float | None = None
    #: the CPU time inside ``edge_step_ms`` (thread time of the head compute): with
    #: it the cost model tells compute (scales with the cut) from waiting (does not)
    edge_cpu_ms: float | None = None
    cloud_step_ms: float | None = None
    #: the device's measured time between two applied steps (the pipeline's real
    #: step time, everything included: compute, the event loop's own work, waits)
    step_interval_ms: float | None = None
    cloud_block_ms: Mapping[int, float] = field(default_factory=dict)
    edge_block_ms: Mapping[int, float] = field(default_factory=dict)
    queue_depth: int | None = None
    #: observations behind each estimate ("rtt", "uplink", "downlink", "edge_step", ...)
    samples: Mapping[str, int] = field(default_factory=dict)
    #: how each bandwidth was obtained: "train", "fit", "remote" or None
    methods: Mapping[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cloud_block_ms"] = {str(k): v for k, v in self.cloud_block_ms.items()}
        d["edge_block_ms"] = {str(k): v for k, v in self.edge_block_ms.items()}
        return d


class LinkChangeDetector:
    """Notices a link that suddenly got much slower, from step round trips.

    Why: the bandwidth estimators look back over dozens of frames, so after a drop
    from WiFi to a 250 kbit/s radio they keep reporting the old rate for many
    (now seconds-long) steps. A step's round trip is measured on the device's own
    clock (no offset); when one exceeds ``factor`` x the recent median by more than
    ``min_jump_s``, the link changed: the estimators start afresh and the engine
    re-decides as soon as a few new frames have been seen.
    """

    def __init__(
        self, window: int = 20, factor: float = 4.0, min_jump_s: float = 0.2, warmup: int = 5, faster: bool = False
    ) -> None:
        self.factor = factor
        self.min_jump_s = min_jump_s
        self.warmup = warmup
        #: also signal a link that got ``factor`` x faster (the device-only probes:
        #: there a recovered link is the news, and no step's round trip shows it)
        self.faster = faster
        self._recent: deque[float] = deque(maxlen=window)

    def observe(self, round_trip_s: float) -> bool:
        """Add one round trip; True when it signals a link change."""
        changed = False
        if len(self._recent) >= self.warmup:
            med = statistics.median(self._recent)
            changed = round_trip_s > self.factor * med and round_trip_s - med > self.min_jump_s
            if self.faster:
                changed = changed or (round_trip_s * self.factor < med and med - round_trip_s > self.min_jump_s)
        if changed:
            self._recent.clear()
        self._recent.append(round_trip_s)
        return changed


class ContextTracker:
    """The device's estimators of a session, fed by ``observe_*`` calls.

    The device observes RTT, the downlink (it receives the gradients: the cloud's
    ``sent_ns`` in the envelope, its own ``recv_ns``), the uplink when the cloud
    echoes its receive time (``Gradients.features_recv_ns``, ``Context.recv_ns``)
    and its own compute. The cloud keeps only compute estimators
    (`ComputeEstimator`, per step and per block) and reports them in ``Context``
    frames; the device merges those with :meth:`observe_remote`. Local estimates
    win over reported ones.
    """

    def __init__(
        self,
        *,
        rtt: RttEstimator | None = None,
        uplink: BandwidthEstimator | None = None,
        downlink: BandwidthEstimator | None = None,
        compute: dict[str, Any] | None = None,
    ) -> None:
        self.rtt = rtt or RttEstimator()
        self.uplink = uplink or BandwidthEstimator()
        self.downlink = downlink or BandwidthEstimator()
        self._compute_kw = compute or {}
        self.edge_step = ComputeEstimator(**self._compute_kw)
        self.edge_cpu = ComputeEstimator(**self._compute_kw)
        self.cloud_step = ComputeEstimator(**self._compute_kw)
        self.step_interval = ComputeEstimator(**self._compute_kw)
        self.edge_blocks: dict[int, ComputeEstimator] = {}
        self.cloud_blocks: dict[int, ComputeEstimator] = {}
        self.queue_depth: int | None = None
        self._remote: dict[str, Any] = {}

    # -- observations -------------------------------------------------------

    def observe_rtt(self, sent_ns: int, recv_ns: int, remote_hold_ns: int = 0) -> None:
        self.rtt.observe(sent_ns, recv_ns, remote_hold_ns)

    def observe_uplink(self, sent_ns: int, recv_ns: int, nbytes: int) -> None:
        """A device->cloud frame: device-clock send time, cloud-clock receive time."""
        self.uplink.observe(sent_ns, recv_ns, nbytes)

    def observe_downlink(self, sent_ns: int, recv_ns: int, nbytes: int) -> None:
        """A cloud->device frame: cloud-clock send time, device-clock receive time."""
        self.downlink.observe(sent_ns, recv_ns, nbytes)

    def observe_edge_step(self, ms: float, cpu_ms: float | None = None) -> None:
        """One applied step's device time (wall, ms), and optionally its CPU time."""
        self.edge_step.observe(ms)
        if cpu_ms is not None:
            self.edge_cpu.observe(cpu_ms)

    def observe_step_interval(self, ms: float) -> None:
        """Time since the previous applied step (device clock); reset it with the
        configuration, since a new one has a new step time."""
        self.step_interval.observe(ms)

    def reset_step_interval(self) -> None:
        self.step_interval = ComputeEstimator(**self._compute_kw)

    def reset_compute(self) -> None:
        """The cut moved: device and cloud do other work per step now."""
        self.edge_step = ComputeEstimator(**self._compute_kw)
        self.edge_cpu = ComputeEstimator(**self._compute_kw)
        self.cloud_step = ComputeEstimator(**self._compute_kw)
        self.reset_step_interval()

    def forget_cloud_compute(self) -> None:
        """The cloud's compute figures are too old to trust (the device trained alone
        for a while, so nothing measured them): the profile's stand until the
        cloud is measured again."""
        self.cloud_step = ComputeEstimator(**self._compute_kw)
        self.cloud_blocks = {}
        for key in ("cloud_step_ms", "cloud_block_ms"):
            self._remote.pop(key, None)

    def observe_cloud_step(self, ms: float) -> None:
        self.cloud_step.observe(ms)

    def observe_edge_block(self, index: int, ms: float) -> None:
        self.edge_blocks.setdefault(index, ComputeEstimator(**self._compute_kw)).observe(ms)

    def observe_cloud_block(self, index: int, ms: float) -> None:
        self.cloud_blocks.setdefault(index, ComputeEstimator(**self._compute_kw)).observe(ms)

    def observe_queue_depth(self, depth: int) -> None:
        self.queue_depth = int(depth)

    def observe_remote(
        self,
        *,
        uplink_bps: float | None = None,
        downlink_bps: float | None = None,
        rtt_s: float | None = None,
        cloud_step_ms: float | None = None,
        cloud_block_ms: Mapping[int, float] | list[float] | None = None,
        queue_depth: int | None = None,
    ) -> None:
        """Merge what the peer reported (a ``Context`` frame). Zero/None = not known."""
        for k, v in (
            ("uplink_bps", uplink_bps),
            ("downlink_bps", downlink_bps),
            ("rtt_s", rtt_s),
            ("cloud_step_ms", cloud_step_ms),
        ):
            if v:
                self._remote[k] = float(v)
        if cloud_block_ms:
            items = cloud_block_ms.items() if isinstance(cloud_block_ms, Mapping) else enumerate(cloud_block_ms)
            self._remote["cloud_block_ms"] = {int(i): float(v) for i, v in items if v}
        if queue_depth is not None:
            self.queue_depth = int(queue_depth)

    # -- the snapshot -------------------------------------------------------

    def _link(self, name: str, est: BandwidthEstimator) -> tuple[float | None, str | None]:
        if est.bps is not None:
            return est.bps, est.method
        if name in self._remote:
            return self._remote[name], "remote"
        return None, None

    def snapshot(self) -> ContextSnapshot:
        up, up_m = self._link("uplink_bps", self.uplink)
        down, down_m = self._link("downlink_bps", self.downlink)
        rtt = self.rtt.rtt_s
        if rtt is None:
            # one-way intercepts: (offset + lat_up) + (-offset + lat_down) = propagation RTT
            cu, cd = self.uplink.base_delay_ns, self.downlink.base_delay_ns
            if cu is not None and cd is not None and cu + cd > 0:
                rtt = (cu + cd) / NS
            else:
                rtt = self._remote.get("rtt_s")
        cloud_blocks = {i: e.value_ms for i, e in self.cloud_blocks.items() if e.value_ms is not None}
        if not cloud_blocks:
            cloud_blocks = dict(self._remote.get("cloud_block_ms", {}))
        cloud_step = self.cloud_step.value_ms
        if cloud_step is None:
            cloud_step = self._remote.get("cloud_step_ms")
        return ContextSnapshot(
            uplink_bps=up,
            downlink_bps=down,
            rtt_s=rtt,
            edge_step_ms=self.edge_step.value_ms,
            edge_cpu_ms=self.edge_cpu.value_ms,
            cloud_step_ms=cloud_step,
            step_interval_ms=self.step_interval.value_ms,
            cloud_block_ms=cloud_blocks,
            edge_block_ms={i: e.value_ms for i, e in self.edge_blocks.items() if e.value_ms is not None},
            queue_depth=self.queue_depth,
            samples={
                "rtt": self.rtt.count,
                "uplink": self.uplink.count,
                "downlink": self.downlink.count,
                "edge_step": self.edge_step.count,
                "cloud_step": self.cloud_step.count,
                "step_interval": self.step_interval.count,
            },
            methods={"uplink": up_m, "downlink": down_m},
        )
