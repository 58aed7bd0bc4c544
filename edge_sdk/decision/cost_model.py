"""The pure cost model of docs/design.md §1: how long does a (point, codec, K) take?

Everything here is arithmetic on plain dataclasses: no tensors, no sockets, no
clocks (codec sizes are `schemas.codecs.encoded_nbytes`, the codec's own answer).
That keeps the model cheap enough for the policy to evaluate every
(point, codec, K) at every decision, and lets tests check it against numbers
worked out by hand.

Units: seconds for times, bytes for sizes, bits per second for links. Profiles
come in milliseconds (that is what profilers print) and are converted here.

One deliberate refinement of the brief's stage times: ``T2`` and ``T4`` are the
*link occupancy* (bytes * 8 / bandwidth) and the propagation delay (RTT) is kept
apart in :attr:`StageTimes.latency_s`. It is part of ``T0`` (a step's latency)
but not of ``T*`` (the bottleneck), because a link carries several frames in
flight: a 200 ms RTT does not cap a 50 Mbit/s link at 5 frames per second. Put
RTT/2 into ``T*`` and a long RTT would *lower* the K the model asks for, the
opposite of what feature replay is for. :meth:`StageTimes.breakdown` still shows
``t2_up_s + rtt/2`` style totals for people reading the output.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from schemas.codecs import LABELS, Codec, encoded_nbytes

#: codecs the engine may pick on its own; top-k is left to explicit requests
#: (its accuracy cost is not in the cost model), and bf16 never beats fp16 in size
AUTO_CODECS: tuple[str, ...] = ("fp32", "fp16", "int8", "int8c", "int4")
#: Lossless first, most aggressive last; used to break exact ties toward accuracy.
_CODEC_RANK = {c: i for i, c in enumerate(LABELS)}


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class StageTimes:
    """Per-step time of the four pipeline stages, in seconds.

    ``t2_up_s`` / ``t4_down_s`` are link occupancy (serialization) only;
    ``latency_s`` is the propagation delay one step pays end to end (one RTT),
    counted in :attr:`total` but not in :attr:`bottleneck` (see module doc).
    """

    t1_edge_s: float
    t2_up_s: float
    t3_cloud_s: float
    t4_down_s: float
    latency_s: float = 0.0

    @property
    def bottleneck(self) -> float:
        """``T*``: the slowest stage; the steady-state time per step of a full pipeline."""
        return max(self.t1_edge_s, self.t2_up_s, self.t3_cloud_s, self.t4_down_s)

    @property
    def total(self) -> float:
        """``T0``: one step's latency from head forward to head update."""
        return self.t1_edge_s + self.t2_up_s + self.t3_cloud_s + self.t4_down_s + self.latency_s

    @property
    def bottleneck_name(self) -> str:
        names = ("edge", "uplink", "cloud", "downlink")
        vals = (self.t1_edge_s, self.t2_up_s, self.t3_cloud_s, self.t4_down_s)
        return names[max(range(4), key=lambda i: vals[i])]

    def breakdown(self) -> dict[str, float | str]:
        """A JSON-friendly dict (seconds) for logs and ``partition_history``."""
        return {
            "t1_edge_s": self.t1_edge_s,
            "t2_up_s": self.t2_up_s,
            "t3_cloud_s": self.t3_cloud_s,
            "t4_down_s": self.t4_down_s,
            "latency_s": self.latency_s,
            "bottleneck_s": self.bottleneck,
            "total_s": self.total,
            "bottleneck": self.bottleneck_name,
        }


def pipeline_time(r: int, K: int, stages: StageTimes) -> float:
    """Wall time of ``r`` steps with at most ``K+1`` in flight (docs/design.md §1).

    ``t(r) = (r-1)*T* + T0 + (ceil(r/(K+1)) - 1) * max(0, T0 - (K+1)*T*)``: the
    pipeline fills once (``T0``), then completes a step every ``T*``; when the window
    is too small to hide a step's latency each later window adds the bubble
    ``T0 - (K+1)*T*``. ``K = 0`` gives ``r*T0`` (plain split learning).
    """
    if r < 0 or K < 0:
        raise ValueError(f"r and K must be >= 0, got r={r} K={K}")
    if r == 0:
        return 0.0
    t_star, t0 = stages.bottleneck, stages.total
    windows = -(-r // (K + 1))  # exact integer ceil
    return (r - 1) * t_star + t0 + (windows - 1) * max(0.0, t0 - (K + 1) * t_star)


def steady_step_time(K: int, stages: StageTimes) -> float:
    """The limit of ``t(r)/r`` for large ``r``: ``T* + bubble/(K+1)``."""
    t_star, t0 = stages.bottleneck, stages.total
    return t_star + max(0.0, t0 - (K + 1) * t_star) / (K + 1)


def min_staleness_to_fill(stages: StageTimes) -> int:
    """Smallest K with ``(K+1)*T* >= T0``: beyond it a larger K buys nothing."""
    t_star, t0 = stages.bottleneck, stages.total
    if t0 <= 0.0:
        return 0
    if t_star <= 0.0:
        raise ValueError("T* = 0 with T0 > 0 (pure latency): no finite K fills the pipeline")
    ratio = t0 / t_star
    if not math.isfinite(ratio):
        raise ValueError(f"T0/T* overflows: T0={t0} T*={t_star}")
    k = max(0, math.ceil(ratio) - 1)
    # nudge the float ceil by one in either direction (bounded: no loops on huge ratios)
    if k > 0 and k * t_star >= t0:
        k -= 1
    elif (k + 1) * t_star < t0:
        k += 1
    return k


# --------------------------------------------------------------------------- inputs


@functools.lru_cache(maxsize=4096)
def _codec_nbytes_cached(shape: tuple[int, ...], codec: str, topk_ratio: float) -> int:
    return int(encoded_nbytes(shape, Codec.parse(codec), topk_ratio=topk_ratio))


def codec_nbytes(shape: Sequence[int], codec: str, topk_ratio: float = 0.1) -> int:
    """Encoded payload bytes of a tensor of ``shape`` under ``codec`` (a label).

    The codec's own answer (``schemas.codecs.encoded_nbytes``: exactly what
    ``encode_tensor`` produces), cached: the policy asks for the same few sizes
    hundreds of times per decision.
    """
    return _codec_nbytes_cached(tuple(int(s) for s in shape), codec, float(topk_ratio))


@dataclass(frozen=True)
class BlockCost:
    """What the model needs to know about one block.

    Edge times are at the *device's* speed (measured, or desktop x slowdown);
    ``cloud_ms`` is the cloud's forward + backward for this block. ``out_bytes``
    maps a codec label to the encoded size of this block's output for one batch
    (the feature sent when the cut is right after this block); ``out_shape`` lets
    missing labels be computed. ``activation_bytes`` is what the block keeps for
    backward during one replay. ``param_bytes`` counts parameters *and* buffers
    (BatchNorm statistics): both migrate when the cut moves.
    """

    edge_forward_ms: float
    edge_backward_ms: float
    cloud_ms: float
    param_bytes: int = 0
    optim_bytes: int = 0
    activation_bytes: int = 0
    out_bytes: Mapping[str, int] = field(default_factory=dict)
    out_shape: tuple[int, ...] | None = None

    _ALIASES: ClassVar[dict[str, str]] = {
        "forward_ms": "edge_forward_ms",
        "backward_ms": "edge_backward_ms",
        "cloud_fwd_bwd_ms": "cloud_ms",
        "cut_bytes": "out_bytes",
        "cut_shape": "out_shape",
    }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlockCost:
        """Build from a plain dict (JSON, hand-written tests). Accepts the profile's
        names (``forward_ms``, ``backward_ms``, ``cut_bytes``, ``cut_shape``)."""
        kw: dict[str, Any] = {}
        for k, v in d.items():
            k = cls._ALIASES.get(k, k)
            if k in cls.__dataclass_fields__ and not k.startswith("_"):
                kw[k] = v
        if "out_shape" in kw and kw["out_shape"] is not None:
            kw["out_shape"] = tuple(int(s) for s in kw["out_shape"])
        kw["out_bytes"] = dict(kw.get("out_bytes") or {})
        return cls(**kw)

    def nbytes(self, codec: str, topk_ratio: float = 0.1) -> int | None:
        """Encoded output size under ``codec``; None when neither table nor shape knows."""
        if codec in self.out_bytes:
            return int(self.out_bytes[codec])
        if self.out_shape is not None:
            return codec_nbytes(self.out_shape, codec, topk_ratio)
        return None


@dataclass(frozen=True)
class LinkEstimate:
    """The link as the model sees it: bandwidth per direction and round-trip time."""

    uplink_bps: float
    downlink_bps: float
    rtt_s: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinkEstimate:
        """Accepts ``*_bps`` or ``*_mbps`` keys and ``rtt_s`` or ``rtt_ms``."""
        up = d["uplink_bps"] if "uplink_bps" in d else d["uplink_mbps"] * 1e6
        down = d["downlink_bps"] if "downlink_bps" in d else d["downlink_mbps"] * 1e6
        rtt = d["rtt_s"] if "rtt_s" in d else d["rtt_ms"] / 1e3
        return cls(float(up), float(down), float(rtt))

    def updated(self, snapshot: Any) -> LinkEstimate:
        """This estimate with whatever a ``ContextSnapshot`` knows (None = keep ours)."""
        up = getattr(snapshot, "uplink_bps", None)
        down = getattr(snapshot, "downlink_bps", None)
        rtt = getattr(snapshot, "rtt_s", None)
        return LinkEstimate(
            float(up) if up else self.uplink_bps,
            float(down) if down else self.downlink_bps,
            float(rtt) if rtt is not None else self.rtt_s,
        )


@dataclass(frozen=True)
class Choice:
    """A configuration: cut after ``point`` blocks, feature ``codec``, staleness ``K``."""

    point: int
    codec: str
    staleness: int

    @property
    def K(self) -> int:
        return self.staleness

    def __str__(self) -> str:
        return f"p={self.point} {self.codec} K={self.staleness}"

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.point, "codec": self.codec, "staleness": self.staleness}

    def needs_drain(self, new: Choice) -> bool:
        """Whether moving from this configuration to ``new`` waits for the in-flight
        steps: raising K alone does not (the window just grows); moving the cut,
        changing the codec or lowering K does."""
        return not (new.point == self.point and new.codec == self.codec and new.staleness >= self.staleness)


@dataclass(frozen=True)
class DecisionInputs:
    """Everything the cost model needs for one decision.

    ``input_bytes`` / ``label_bytes``: one batch as stored on the device and sent
    up (labels travel with the features in the default placement).
    ``grad_codec``: codec of the gradient coming down; None = same as features.
    ``codec_s_per_byte``: device cost of quantizing features and de-quantizing
    gradients, per fp32 byte touched (small; scale it with the device slowdown).
    ``frame_overhead_bytes``: envelope + tensor header per frame.
    ``replay``: the head forward runs twice per step (upload, then replay); set
    False for a runtime that keeps the graph at K = 0.
    ``cut_points``: valid ``p`` (from ``BlockModel.cut_points``); None = 0..L.
    """

    blocks: tuple[BlockCost, ...]
    link: LinkEstimate
    input_bytes: int
    label_bytes: int = 0
    remaining_steps: int = 1000
    grad_codec: str | None = "fp16"
    codec_s_per_byte: float = 1e-9
    frame_overhead_bytes: int = 256
    topk_ratio: float = 0.1
    replay: bool = True
    cut_points: tuple[int, ...] | None = None
    #: device *wall* time per split step that is not compute (thread hand-offs,
    #: timer slack, preemption), in seconds; calibrated by :func:`apply_context`
    #: from the measured edge step minus its measured CPU time. It does not grow
    #: with a deeper cut, so it is never spread over the blocks.
    edge_step_overhead_s: float = 0.0
    #: measured device compute of one whole split step at a point (forward, replayed
    #: forward, backward, optimizer step, the pipeline's bookkeeping; no codec),
    #: seconds at device speed. Where present it replaces the block sum: per-block
    #: timings miss the optimizer and the per-step bookkeeping, and those do not
    #: scale with the blocks (see ``edge_sdk.timing.pipeline_step_ms``).
    head_step_s: Mapping[int, float] = field(default_factory=dict)
    #: measured device time of the codec per step, ``(point, codec) -> seconds`` at
    #: device speed (feature encode + gradient decode + error feedback); where
    #: missing, ``codec_s_per_byte`` prices it
    codec_step_s: Mapping[tuple[int, str], float] = field(default_factory=dict)
    #: per-step compute the block sum misses, for points without ``head_step_s``
    #: (estimated from the points that have one), seconds at device speed
    edge_step_fixed_s: float = 0.0
    #: device time / this machine's CPU time in emulation (1 on a real device):
    #: turns a measured per-step CPU time into device compute for calibration
    device_slowdown: float = 1.0
    #: split steps measured this much slower than the model explains (a link- or
    #: cloud-bound split whose step interval is longer than its stages: CPU the
    #: device shares with the network stack or other processes, e.g. emulation
    #: on one machine at 1x); every split candidate pays it, training alone does
    #: not (`DecisionController` learns it, see ``split_slowdown``)
    split_slowdown: float = 1.0
    #: the device's compute while a split runs over its compute training alone,
    #: both measured by CPU time in this run (`DecisionController` learns it at
    #: each change between the two): >1 when splitting makes the device's own
    #: kernels slower, e.g. emulation where the cloud computes on the same cores.
    #: It scales the device compute of every split candidate, not of training
    #: alone; `split_slowdown` is the other gap, time outside the device's compute
    split_compute_factor: float = 1.0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def points(self) -> tuple[int, ...]:
        return self.cut_points if self.cut_points is not None else tuple(range(self.num_blocks + 1))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecisionInputs:
        """Build from plain data: ``{"blocks": [{...}, ...], "link": {...}, ...}``."""
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["blocks"] = tuple(b if isinstance(b, BlockCost) else BlockCost.from_dict(b) for b in d["blocks"])
        link = d["link"]
        kw["link"] = link if isinstance(link, LinkEstimate) else LinkEstimate.from_dict(link)
        if kw.get("cut_points") is not None:
            kw["cut_points"] = tuple(int(p) for p in kw["cut_points"])
        return cls(**kw)

    def with_link(self, link: LinkEstimate) -> DecisionInputs:
        return replace(self, link=link)

    def with_remaining(self, remaining_steps: int) -> DecisionInputs:
        return replace(self, remaining_steps=int(remaining_steps))

    def edge_compute_s(self, point: int) -> float:
        """Device compute of one split step at ``point`` without the codec: the
        measured head step where there is one, else the blocks' forward (twice with
        replay) + backward + the fixed per-step part."""
        if point in self.head_step_s:
            return float(self.head_step_s[point])
        head = self.blocks[:point]
        fwd = sum(b.edge_forward_ms for b in head) / 1e3
        bwd = sum(b.edge_backward_ms for b in head) / 1e3
        # device-only runs one forward (no replay: the loss is right there)
        replays = 2.0 if self.replay and point < self.num_blocks else 1.0
        return fwd * replays + bwd + (self.edge_step_fixed_s if point > 0 else 0.0)

    def codec_compute_s(self, point: int, codec: str) -> float:
        """Device time of quantizing the features and de-quantizing the gradient."""
        if point <= 0:
            return 0.0
        if (point, codec) in self.codec_step_s:
            return float(self.codec_step_s[(point, codec)])
        fp32 = self.blocks[point - 1].nbytes("fp32", self.topk_ratio) or 0
        touched = (fp32 if codec != "fp32" else 0) + (fp32 if (self.grad_codec or codec) != "fp32" else 0)
        return touched * self.codec_s_per_byte

    def scale_edge_compute(self, f: float) -> DecisionInputs:
        """Every device compute term times ``f`` (a device faster or slower than profiled)."""
        return replace(
            self,
            blocks=tuple(
                replace(b, edge_forward_ms=b.edge_forward_ms * f, edge_backward_ms=b.edge_backward_ms * f) for b in self.blocks
            ),
            head_step_s={p: v * f for p, v in self.head_step_s.items()},
            edge_step_fixed_s=self.edge_step_fixed_s * f,
            codec_step_s={k: v * f for k, v in self.codec_step_s.items()},
            codec_s_per_byte=self.codec_s_per_byte * f,
        )

    def feature_nbytes(self, point: int, codec: str) -> int | None:
        """Bytes of the features crossing cut ``point`` (raw input when ``point == 0``)."""
        if point == 0:
            return self.input_bytes if codec == "fp32" else None
        return self.blocks[point - 1].nbytes(codec, self.topk_ratio)

    def gradient_nbytes(self, point: int, codec: str) -> int:
        """Bytes of the feature gradient coming down (none at ``point == 0``)."""
        if point == 0 or point >= self.num_blocks:
            return 0
        gcodec = self.grad_codec or codec
        n = self.blocks[point - 1].nbytes(gcodec, self.topk_ratio)
        if n is None:
            raise ValueError(f"no size for gradient codec {gcodec!r} at point {point}: give out_shape or out_bytes")
        return n

    def codecs_at(self, point: int) -> tuple[str, ...]:
        """Codec labels whose feature size is known at ``point``."""
        if point == 0:
            return ("fp32",)
        if point >= self.num_blocks:
            return ("fp32",)
        return tuple(c for c in LABELS if self.feature_nbytes(point, c) is not None)


# --------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class Prediction:
    """What the model says about one :class:`Choice`, with enough detail to explain it."""

    choice: Choice
    stages: StageTimes
    remaining_steps: int
    step_time_s: float
    total_time_s: float
    memory_bytes: int
    memory: Mapping[str, int]
    feature_bytes: int
    gradient_bytes: int
    device_only: bool = False

    @property
    def point(self) -> int:
        return self.choice.point

    @property
    def codec(self) -> str:
        return self.choice.codec

    @property
    def K(self) -> int:
        return self.choice.staleness

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (for ``partition_history`` and bench output)."""
        return {
            **self.choice.to_dict(),
            "step_time_s": self.step_time_s,
            "total_time_s": self.total_time_s,
            "remaining_steps": self.remaining_steps,
            "memory_bytes": self.memory_bytes,
            "memory": dict(self.memory),
            "feature_bytes": self.feature_bytes,
            "gradient_bytes": self.gradient_bytes,
            "device_only": self.device_only,
            **self.stages.breakdown(),
        }

    def explain(self) -> str:
        """One line a person can read: where the time goes and what bounds it."""
        s = self.stages
        if self.device_only:
            return f"{self.choice}: device-only, {s.t1_edge_s * 1e3:.1f} ms/step"
        return (
            f"{self.choice}: {self.step_time_s * 1e3:.1f} ms/step "
            f"(edge {s.t1_edge_s * 1e3:.1f}, up {s.t2_up_s * 1e3:.1f}, cloud {s.t3_cloud_s * 1e3:.1f}, "
            f"down {s.t4_down_s * 1e3:.1f}, rtt {s.latency_s * 1e3:.1f} ms; bound by {s.bottleneck_name})"
        )


def stage_times(config: Choice, inputs: DecisionInputs) -> StageTimes:
    """T1..T4 (+ latency) of ``config``; see the module doc for the latency split."""
    p, L = config.point, inputs.num_blocks
    if not 0 <= p <= L:
        raise ValueError(f"point {p} outside 0..{L}")
    if p == L:  # device-only: forward + loss + backward + optimizer, no link, no replay
        return StageTimes(inputs.edge_compute_s(L) + inputs.edge_step_overhead_s, 0.0, 0.0, 0.0, 0.0)
    feat = inputs.feature_nbytes(p, config.codec)
    if feat is None:
        raise ValueError(f"no feature size for codec {config.codec!r} at point {p}")
    grad = inputs.gradient_nbytes(p, config.codec)
    t1 = (inputs.edge_compute_s(p) + inputs.codec_compute_s(p, config.codec)) * inputs.split_compute_factor
    t1 += inputs.edge_step_overhead_s
    link = inputs.link
    t2 = (feat + inputs.label_bytes + inputs.frame_overhead_bytes) * 8.0 / link.uplink_bps
    t3 = sum(b.cloud_ms for b in inputs.blocks[p:]) / 1e3
    t4 = (grad + inputs.frame_overhead_bytes) * 8.0 / link.downlink_bps
    return StageTimes(t1, t2, t3, t4, link.rtt_s)


def memory_use(config: Choice, inputs: DecisionInputs) -> dict[str, int]:
    """Device memory of ``config``, by component (bytes).

    The window holds ``K+1`` steps in flight, each an input batch + labels + the
    quantization error ``E`` (fp32, cut-sized; none for a lossless codec). One
    replay at a time keeps the head's activations. Head params + optimizer state
    always live on the device.
    """
    p, L = config.point, inputs.num_blocks
    head = inputs.blocks[:p]
    params = sum(b.param_bytes for b in head)
    optim = sum(b.optim_bytes for b in head)
    acts = sum(b.activation_bytes for b in head)
    if p == L:
        return {
            "stored_batches": inputs.input_bytes + inputs.label_bytes,
            "error_feedback": 0,
            "activations": acts,
            "params": params,
            "optim": optim,
        }
    per_step_e = 0
    if p > 0 and config.codec != "fp32":
        per_step_e = inputs.blocks[p - 1].nbytes("fp32", inputs.topk_ratio) or 0
    window = config.staleness + 1
    return {
        "stored_batches": window * (inputs.input_bytes + inputs.label_bytes),
        "error_feedback": window * per_step_e,
        "activations": acts,
        "params": params,
        "optim": optim,
    }


def predict(config: Choice, inputs: DecisionInputs) -> Prediction:
    """Predicted step time, total time over ``inputs.remaining_steps``, breakdown, memory."""
    st = stage_times(config, inputs)
    r = inputs.remaining_steps
    L = inputs.num_blocks
    device_only = config.point == L
    if device_only:
        config = Choice(L, "fp32", 0)
        total = r * st.t1_edge_s
        step = st.t1_edge_s
    else:
        total = pipeline_time(r, config.staleness, st) * inputs.split_slowdown
        step = total / r if r > 0 else steady_step_time(config.staleness, st) * inputs.split_slowdown
    mem = memory_use(config, inputs)
    feat = 0 if device_only else (inputs.feature_nbytes(config.point, config.codec) or 0)
    return Prediction(
        choice=config,
        stages=st,
        remaining_steps=r,
        step_time_s=step,
        total_time_s=total,
        memory_bytes=sum(mem.values()),
        memory=mem,
        feature_bytes=feat,
        gradient_bytes=0 if device_only else inputs.gradient_nbytes(config.point, config.codec),
        device_only=device_only,
    )


def migration_time(inputs: DecisionInputs, a: int, b: int) -> float:
    """One-off time to move the cut from ``a`` to ``b``: weights + optimizer state of
    blocks ``[min, max)`` over the link they cross, plus one RTT for the handshake.

    Deeper cut (``b > a``): blocks come down from the cloud. Shallower: they go up.
    """
    if a == b:
        return 0.0
    lo, hi = min(a, b), max(a, b)
    nbytes = sum(b_.param_bytes + b_.optim_bytes for b_ in inputs.blocks[lo:hi])
    bps = inputs.link.downlink_bps if b > a else inputs.link.uplink_bps
    return nbytes * 8.0 / bps + inputs.link.rtt_s


def drain_time(current: Prediction) -> float:
    """Throughput lost by draining ``current``'s in-flight steps before a switch.

    A full window overlaps ``T0 - T*`` of latency with useful work; draining gives
    that overlap up once (at most ``K*T*``: a short window hides less). K = 0 has
    nothing in flight between steps, so nothing to lose.
    """
    if current.device_only or current.K == 0:
        return 0.0
    st = current.stages
    return max(0.0, min(st.total - st.bottleneck, current.K * st.bottleneck))


# --------------------------------------------------------------------------- adapters


def apply_context(inputs: DecisionInputs, snapshot: Any, current: Choice | None = None) -> DecisionInputs:
    """Calibrate ``inputs`` with measurements (a ``edge_sdk.context.ContextSnapshot``).

    * the link: measured uplink/downlink/RTT replace the configured ones (None = keep);
    * cloud time: per-block ms replace the profile's where reported; else a
      measured cloud step time rescales the tail of ``current`` (and so all blocks)
      by measured / predicted;
    * edge time, with the step's measured CPU time (``edge_cpu_ms``): device
      compute = CPU x ``device_slowdown``; every compute term is scaled by
      measured / predicted compute of ``current`` (a busy or throttled device runs
      *all* its kernels slower: the profile's shape across points is trusted, its
      absolute speed is not), and the rest of the measured step (wall - compute:
      thread hand-offs, timer slack) becomes the fixed ``edge_step_overhead_s``;
    * edge time without a CPU measurement: faster than predicted scales the
      compute down; slower adds the difference as a fixed per-step cost.
    Duck-typed on the snapshot so the cost model does not import the estimators.
    """
    out = replace(inputs, link=inputs.link.updated(snapshot))
    blocks = list(out.blocks)
    cloud_block_ms = getattr(snapshot, "cloud_block_ms", None) or {}
    if isinstance(cloud_block_ms, Sequence):
        cloud_block_ms = dict(enumerate(cloud_block_ms))
    if cloud_block_ms:
        blocks = [
            replace(b, cloud_ms=float(cloud_block_ms[i])) if cloud_block_ms.get(i) is not None else b
            for i, b in enumerate(blocks)
        ]
    out = replace(out, blocks=tuple(blocks))
    if current is None or not 0 <= current.point <= out.num_blocks:
        return out
    st = stage_times(current, out)
    cloud_ms = getattr(snapshot, "cloud_step_ms", None)
    if cloud_ms and not cloud_block_ms and st.t3_cloud_s > 0:
        f = (cloud_ms / 1e3) / st.t3_cloud_s
        out = replace(out, blocks=tuple(replace(b, cloud_ms=b.cloud_ms * f) for b in out.blocks))
    edge_ms = getattr(snapshot, "edge_step_ms", None)
    factor = device_compute_factor(out, snapshot, current)
    if edge_ms and factor is not None:
        out = out.scale_edge_compute(factor)
        measured_compute = out.device_slowdown * snapshot.edge_cpu_ms / 1e3
        out = replace(out, edge_step_overhead_s=max(0.0, edge_ms / 1e3 - measured_compute))
    elif edge_ms and st.t1_edge_s > 0:
        measured = edge_ms / 1e3
        if measured < st.t1_edge_s:
            # a faster device than profiled: scale its compute down
            out = replace(out.scale_edge_compute(measured / st.t1_edge_s), edge_step_overhead_s=0.0)
        else:
            # slower than the compute explains: a per-step fixed cost (it does not
            # grow with a deeper cut, so it must not be spread over blocks)
            out = replace(out, edge_step_overhead_s=out.edge_step_overhead_s + measured - st.t1_edge_s)
    return _calibrate_interval(out, snapshot, current)


def device_compute_factor(inputs: DecisionInputs, snapshot: Any, current: Choice) -> float | None:
    """Measured device compute of ``current`` (its step's CPU time x ``device_slowdown``)
    over the compute ``inputs`` predict for it; None without a CPU measurement."""
    cpu_ms = getattr(snapshot, "edge_cpu_ms", None)
    if not cpu_ms or not 0 <= current.point <= inputs.num_blocks:
        return None
    compute = stage_times(current, inputs).t1_edge_s - inputs.edge_step_overhead_s  # compute + codec
    return inputs.device_slowdown * cpu_ms / 1e3 / compute if compute > 0 else None


#: link samples (since a reset) before an estimate counts as measured, not assumed
LINK_MIN_SAMPLES = 6
#: step intervals this many steps after a switch or less are not yet the new configuration's
MIN_INTERVAL_SAMPLES = 5


def _calibrate_interval(inputs: DecisionInputs, snapshot: Any, current: Choice) -> DecisionInputs:
    """The device's measured step interval against the predicted step time of ``current``.

    Why: the device's compute spans miss the work its event loop does between them
    (framing, sending, decoding, the estimators); when the device is the bottleneck
    that work is part of every step (measured: ~9 ms of a 27 ms step of the digits
    CNN at p=1 on WiFi). When the current configuration is predicted edge-bound (or
    device-only) and steps come slower than predicted, the gap becomes device
    per-step overhead, which every candidate pays. Link-bound or cloud-bound
    configurations are left alone: there a gap says the link or cloud estimate is
    off, not the device.
    """
    interval = getattr(snapshot, "step_interval_ms", None)
    samples = (getattr(snapshot, "samples", {}) or {}).get("step_interval", 0)
    if not interval or samples < MIN_INTERVAL_SAMPLES:
        return inputs
    pred = predict(current, inputs)
    st = pred.stages
    if not (pred.device_only or st.bottleneck_name == "edge"):
        return inputs
    samples_of = getattr(snapshot, "samples", {}) or {}
    assumed = any(
        getattr(snapshot, f"{d}_bps", None) is None or samples_of.get(d, 0) < LINK_MIN_SAMPLES for d in ("uplink", "downlink")
    )
    if not pred.device_only and assumed:
        return inputs  # "edge-bound" on an assumed link: the gap may well be the link's
    gap = interval / 1e3 - steady_step_time(current.staleness, st) if not pred.device_only else interval / 1e3 - st.t1_edge_s
    if gap <= 0:
        return inputs
    return replace(inputs, edge_step_overhead_s=inputs.edge_step_overhead_s + gap)


#: a split's measured step this much slower than predicted (after calibration) is
#: priced into every split; within it the gap is noise
SPLIT_SLOWDOWN_BAND = 1.15
#: the most it is trusted to say (a longer gap is a link that changed, not a constant cost)
MAX_SPLIT_SLOWDOWN = 4.0


def split_slowdown(inputs: DecisionInputs, snapshot: Any, current: Choice) -> float | None:
    """The measured step interval of split ``current`` over its predicted steady
    step (``inputs`` calibrated, so an edge-bound gap is already device overhead);
    None when there is no say (device-only, too few samples), 1.0 within the band."""
    interval = getattr(snapshot, "step_interval_ms", None)
    samples = (getattr(snapshot, "samples", {}) or {}).get("step_interval", 0)
    if current.point >= inputs.num_blocks or not interval or samples < MIN_INTERVAL_SAMPLES:
        return None
    modelled = steady_step_time(current.staleness, stage_times(current, inputs))  # without any slowdown
    if modelled <= 0:
        return None
    ratio = (interval / 1e3) / modelled
    return 1.0 if ratio < SPLIT_SLOWDOWN_BAND else min(MAX_SPLIT_SLOWDOWN, ratio)


def inputs_from_profile(
    profile: Any,
    *,
    link: LinkEstimate,
    device_slowdown: float = 1.0,
    cloud_speedup: float = 1.0,
    input_bytes: int | None = None,
    label_bytes: int = 0,
    remaining_steps: int = 1000,
    cut_points: Iterable[int] | None = None,
    **kw: Any,
) -> DecisionInputs:
    """Build :class:`DecisionInputs` from ``edge_sdk.profile.profile_model(...)``.

    The profile is measured on this (desktop) machine: the device runs it
    ``device_slowdown`` times slower (``edge_sdk.devices``), the cloud
    ``cloud_speedup`` times faster (cloud ms per block = (forward + backward) /
    speedup). Reads ``ModelProfile`` / ``BlockProfile`` or their ``to_dict()``
    form (``output_bytes``, ``output_shape``, ``optimizer_state_bytes``,
    ``input_bytes`` per codec, ``cut_points``). Labels are not in the profile:
    pass ``label_bytes`` (e.g. ``batch_size * 8`` for int64 class ids). Extra
    keywords go to :class:`DecisionInputs`.
    """

    def get(obj: Any, *names: str, default: Any = None) -> Any:
        for name in names:
            v = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
            if v is not None:
                return v
        return default

    blocks = []
    for pb in get(profile, "blocks"):
        fwd, bwd = float(get(pb, "forward_ms")), float(get(pb, "backward_ms"))
        shape = get(pb, "output_shape", "cut_shape", "out_shape")
        blocks.append(
            BlockCost(
                edge_forward_ms=fwd * device_slowdown,
                edge_backward_ms=bwd * device_slowdown,
                cloud_ms=(fwd + bwd) / cloud_speedup,
                param_bytes=int(get(pb, "param_bytes", default=0)) + int(get(pb, "buffer_bytes", default=0)),
                optim_bytes=int(get(pb, "optimizer_state_bytes", "optim_bytes", default=0)),
                activation_bytes=int(get(pb, "activation_bytes", default=0)),
                out_bytes=dict(get(pb, "output_bytes", "cut_bytes", "out_bytes", default={})),
                out_shape=tuple(int(s) for s in shape) if shape is not None else None,
            )
        )
    if input_bytes is None:
        ib = get(profile, "input_bytes")
        if ib is None:
            raise ValueError("input_bytes: neither given nor on the profile")
        input_bytes = ib["fp32"] if isinstance(ib, Mapping) else ib
    if cut_points is None:
        cut_points = get(profile, "cut_points")
    kw.setdefault("codec_s_per_byte", DecisionInputs.codec_s_per_byte * device_slowdown)
    return DecisionInputs(
        blocks=tuple(blocks),
        link=link,
        input_bytes=int(input_bytes),
        label_bytes=int(label_bytes),
        remaining_steps=int(remaining_steps),
        cut_points=tuple(int(p) for p in cut_points) if cut_points is not None else None,
        device_slowdown=float(device_slowdown),
        **kw,
    )
