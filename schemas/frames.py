"""Typed frames and the validating encoder/decoder for ``frames.fbs``.

Why not the generated reader classes: FlatBuffers' Python runtime has no
verifier, and its accessors trust every offset in the buffer. A frame comes
from an untrusted peer, so `decode` walks the buffer itself and checks each
offset, length, enum value and required field *before* it builds anything
from the frame's claims; tensor payloads come out as numpy views over the
received buffer (no copy). The field layout below (`_SPECS`) is the .fbs in
table form: slot i is the i-th field of the table. Tests cross-check it
against the generated code and against ``flatc --json``, so a mismatch with
the schema fails CI.

Encoding uses the FlatBuffers builder for the small parts and appends the
largest tensor payload to its output (one copy, no element-by-element work;
see `_Encoder`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import flatbuffers
import numpy as np

from .codecs import Codec, DType, TensorFrame, check_tensor_frame
from .errors import ErrorCode, WireError

__all__ = [
    "FILE_IDENTIFIER",
    "FRAME_TYPES",
    "PROTOCOL_VERSION",
    "TENSOR_OVERHEAD_BYTES",
    "WEIGHT_KINDS",
    "Bye",
    "Checkpoint",
    "CheckpointAck",
    "Context",
    "Envelope",
    "EpochEnd",
    "Error",
    "EvalResult",
    "Features",
    "Frame",
    "Gradients",
    "Hello",
    "HelloAck",
    "Limits",
    "ProtocolVersion",
    "Repartition",
    "RepartitionAck",
    "Weights",
    "decode",
    "encode",
]


class ProtocolVersion(NamedTuple):
    major: int
    minor: int


#: Bump minor for additive schema changes, major for breaking ones (frames.fbs rule 5).
PROTOCOL_VERSION = ProtocolVersion(1, 1)
FILE_IDENTIFIER = b"SRW1"
#: Upper bound of the bytes a frame adds around one tensor's `TensorFrame.nbytes`
#: (tables, vtables, shape, alignment); for the cost model.
TENSOR_OVERHEAD_BYTES = 256
WEIGHT_KINDS = ("param", "buffer", "optim")


#: Protocol rule: an evaluation ``Features`` frame carries at most
#: ``max(Hello.batch_size, MAX_EVAL_BATCH)`` samples (the device's default eval batch).
MAX_EVAL_BATCH = 256
#: the most filler bytes a ``Context`` bandwidth probe carries or asks for
MAX_PADDING = 1 << 16


#: the largest frame either end sends or accepts by default (the server's
#: ``--max-frame-bytes``); a 4 MiB feature tensor at fp32 fits many times over
MAX_FRAME_BYTES = 64 << 20


@dataclass(frozen=True)
class Limits:
    """Decoder limits; everything a peer claims is checked against these first."""

    max_frame_bytes: int = MAX_FRAME_BYTES
    max_rank: int = 8
    max_string_bytes: int = 1 << 20
    max_list_len: int = 1 << 16
    #: decoded elements per tensor; also bounds what a tiny sparse top-k frame can make
    #: the receiver allocate (64 Mi elements = 256 MiB of float32)
    max_elements: int = 1 << 26


# ----------------------------------------------------------------------------- frames


@dataclass
class Hello:
    model: str = ""
    model_hash: str = ""
    num_blocks: int = 0
    point: int = 0
    codec: str = ""
    staleness: int = 0
    optimizer_json: str = ""
    token: str = ""
    batch_size: int = 0
    seed: int = 0
    config_json: str = ""
    runtime: str = ""
    program_hash: str = ""
    #: != 0: re-attach to this session (detached when its connection dropped)
    resume_session: int = 0
    resume_token: str = ""
    #: resuming: the newest checkpoint step the device holds (-1: none)
    resume_step: int = -1
    #: resuming: the device restarted from that checkpoint (its live state is gone): roll back to it
    resume_restart: bool = False


@dataclass
class HelloAck:
    session: int = 0
    accepted: bool = False
    point: int = 0
    codec: str = ""
    staleness: int = 0
    message: str = ""
    #: the secret a later Hello presents to re-attach (compared in constant time)
    resume_token: str = ""
    resumed: bool = False
    last_step: int = -1  # resumed: the newest step the cloud applied
    #: resumed from a checkpoint: both sides roll back to this step (-1: carry on live)
    restored_step: int = -1
    #: the cloud keeps checkpoints (``serve --state-dir``)
    checkpoints: bool = False


@dataclass
class Features:
    step: int
    epoch: int
    point: int
    tensor: TensorFrame
    labels: TensorFrame | None = None
    train: bool = True
    grad_codec: str = ""  # "": the session's codec


@dataclass
class Gradients:
    step: int
    tensor: TensorFrame | None = None  # None for evaluation steps
    loss: float = 0.0
    correct: int = 0
    count: int = 0
    cloud_ms: float = 0.0
    features_recv_ns: int = 0
    queue_depth: int = 0


@dataclass
class Context:
    step: int = 0
    uplink_bps: float = 0.0
    downlink_bps: float = 0.0
    rtt_ms: float = 0.0
    cloud_step_ms: float = 0.0
    cloud_block_ms: list[float] = field(default_factory=list)
    queue_depth: int = 0
    request: bool = False
    recv_ns: int = 0
    #: filler bytes carried (a bandwidth probe: only their count travels in Python)
    padding: int = 0
    #: a request asks for this many filler bytes in the answer (at most ``MAX_PADDING``)
    reply_padding: int = 0


@dataclass
class Repartition:
    step: int = 0
    point: int = 0
    codec: str = ""
    staleness: int = 0
    #: SHA-256 (hex) of the device's copy of the blocks coming down, when it has one
    #: (it builds the whole model from the seed): equal to the cloud's, none travel
    state_hash: str = ""


@dataclass
class RepartitionAck:
    step: int = 0
    point: int = 0
    accepted: bool = False
    message: str = ""
    #: the cloud's copy matched ``Repartition.state_hash``: no Weights were sent
    state_matched: bool = False


@dataclass
class Weights:
    step: int
    name: str
    kind: str  # "param" | "buffer" | "optim"
    tensor: TensorFrame
    chunk: int = 0
    chunks: int = 1
    last: bool = False
    block: int = -1


@dataclass
class EpochEnd:
    epoch: int = 0
    step: int = 0
    train: bool = True


@dataclass
class EvalResult:
    epoch: int = 0
    loss: float = 0.0
    correct: int = 0
    count: int = 0


@dataclass
class Error:
    code: ErrorCode = ErrorCode.UNKNOWN
    message: str = ""
    step: int = -1


@dataclass
class Bye:
    reason: str = ""


@dataclass
class Checkpoint:
    """Save the session at ``step``: nothing is in flight, every earlier step is applied."""

    step: int = 0
    epoch: int = 0


@dataclass
class CheckpointAck:
    step: int = 0
    saved: bool = False
    message: str = ""


Frame = (
    Hello
    | HelloAck
    | Features
    | Gradients
    | Context
    | Repartition
    | RepartitionAck
    | Weights
    | EpochEnd
    | EvalResult
    | Error
    | Bye
    | Checkpoint
    | CheckpointAck
)

#: union members in schema order; the union type id is index + 1.
FRAME_TYPES: tuple[type, ...] = (
    Hello,
    HelloAck,
    Features,
    Gradients,
    Context,
    Repartition,
    RepartitionAck,
    Weights,
    EpochEnd,
    EvalResult,
    Error,
    Bye,
    Checkpoint,
    CheckpointAck,
)


@dataclass
class Envelope:
    frame: Any
    session: int = 0
    seq: int = 0
    sent_ns: int = 0
    version: ProtocolVersion = PROTOCOL_VERSION


# ----------------------------------------------------------------------------- layout
# (python attribute, kind, wire default) per table, in .fbs field order.
# kinds: scalars by struct letter, "str", "tensor", "tensor?" (optional),
# "f32[]", "pad" (a ubyte vector of zeros, held as its length), "kind" (WeightKind
# as str), "ecode" (ErrorCode).

_SPECS: dict[type, tuple[tuple[str, str, Any], ...]] = {
    Hello: (
        ("model", "str", ""),
        ("model_hash", "str", ""),
        ("num_blocks", "i", 0),
        ("point", "i", 0),
        ("codec", "str", ""),
        ("staleness", "i", 0),
        ("optimizer_json", "str", ""),
        ("token", "str", ""),
        ("batch_size", "i", 0),
        ("seed", "q", 0),
        ("config_json", "str", ""),
        ("runtime", "str", ""),
        ("program_hash", "str", ""),
        ("resume_session", "Q", 0),
        ("resume_token", "str", ""),
        ("resume_step", "q", -1),
        ("resume_restart", "?", False),
    ),
    HelloAck: (
        ("session", "Q", 0),
        ("accepted", "?", False),
        ("point", "i", 0),
        ("codec", "str", ""),
        ("staleness", "i", 0),
        ("message", "str", ""),
        ("resume_token", "str", ""),
        ("resumed", "?", False),
        ("last_step", "q", -1),
        ("restored_step", "q", -1),
        ("checkpoints", "?", False),
    ),
    Features: (
        ("step", "q", 0),
        ("epoch", "i", 0),
        ("point", "i", 0),
        ("tensor", "tensor", None),
        ("labels", "tensor?", None),
        ("train", "?", True),
        ("grad_codec", "str", ""),
    ),
    Gradients: (
        ("step", "q", 0),
        ("tensor", "tensor?", None),
        ("loss", "d", 0.0),
        ("correct", "q", 0),
        ("count", "q", 0),
        ("cloud_ms", "f", 0.0),
        ("features_recv_ns", "q", 0),
        ("queue_depth", "i", 0),
    ),
    Context: (
        ("step", "q", 0),
        ("uplink_bps", "d", 0.0),
        ("downlink_bps", "d", 0.0),
        ("rtt_ms", "f", 0.0),
        ("cloud_step_ms", "f", 0.0),
        ("cloud_block_ms", "f32[]", None),
        ("queue_depth", "i", 0),
        ("request", "?", False),
        ("recv_ns", "q", 0),
        ("padding", "pad", 0),
        ("reply_padding", "I", 0),
    ),
    Repartition: (("step", "q", 0), ("point", "i", 0), ("codec", "str", ""), ("staleness", "i", 0), ("state_hash", "str", "")),
    RepartitionAck: (
        ("step", "q", 0),
        ("point", "i", 0),
        ("accepted", "?", False),
        ("message", "str", ""),
        ("state_matched", "?", False),
    ),
    Weights: (
        ("step", "q", 0),
        ("name", "str", ""),
        ("kind", "kind", 0),
        ("tensor", "tensor", None),
        ("chunk", "i", 0),
        ("chunks", "i", 1),
        ("last", "?", False),
        ("block", "i", -1),
    ),
    EpochEnd: (("epoch", "i", 0), ("step", "q", 0), ("train", "?", True)),
    EvalResult: (("epoch", "i", 0), ("loss", "d", 0.0), ("correct", "q", 0), ("count", "q", 0)),
    Error: (("code", "ecode", 0), ("message", "str", ""), ("step", "q", -1)),
    Bye: (("reason", "str", ""),),
    Checkpoint: (("step", "q", 0), ("epoch", "i", 0)),
    CheckpointAck: (("step", "q", 0), ("saved", "?", False), ("message", "str", "")),
}
_TYPE_ID = {cls: i + 1 for i, cls in enumerate(FRAME_TYPES)}

# Envelope slots: version_major, version_minor, session, seq, sent_ns, frame_type, frame
# Tensor slots: dtype, shape, codec, payload, scales, zero_points, k, axis, orig_dtype, indices

_STRUCTS = {c: struct.Struct("<" + c) for c in "?BHIQbhiqfd"}
_SIZES = {c: s.size for c, s in _STRUCTS.items()}
_U8, _U16, _U32, _I32 = _STRUCTS["B"], _STRUCTS["H"], _STRUCTS["I"], _STRUCTS["i"]
_U16X2 = struct.Struct("<HH")

# ----------------------------------------------------------------------------- encode

_PREPEND = {
    "?": "PrependBoolSlot",
    "B": "PrependUint8Slot",
    "H": "PrependUint16Slot",
    "I": "PrependUint32Slot",
    "Q": "PrependUint64Slot",
    "i": "PrependInt32Slot",
    "q": "PrependInt64Slot",
    "f": "PrependFloat32Slot",
    "d": "PrependFloat64Slot",
}
_SPLICE_MIN = 1024  # a payload at least this big is appended, not copied into the builder
_PAYLOAD_ALIGN = 16


class _Encoder:
    """One-shot builder wrapper that appends the largest payload without copying it in.

    FlatBuffers builds back to front, so the first vector created ends up at
    the very end of the buffer. The encoder creates the big payload's vector
    first with length 0 (aligned to 16 like any payload), lets the builder lay
    out everything else, then patches the length and appends the payload:
    offsets point at the vector's length prefix, which does not move, so the
    result is a byte-exact FlatBuffer, built with one copy of the payload
    (into the output) and a builder of a few hundred bytes.
    """

    def __init__(self, size_hint: int, big: TensorFrame | None) -> None:
        self.b = flatbuffers.Builder(size_hint)
        self.big = big
        self.big_data: np.ndarray | None = None
        self.big_vec = 0
        if big is not None:
            self.big_data = np.ascontiguousarray(big.payload).reshape(-1).view(np.uint8)
            self.b.StartVector(1, 0, _PAYLOAD_ALIGN)
            self.big_vec = self.b.EndVector()

    def payload(self, arr: np.ndarray) -> int:
        b = self.b
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        nb = int(data.size)
        b.StartVector(1, nb, _PAYLOAD_ALIGN)
        if nb:
            b.head -= nb
            b.Bytes[b.head : b.head + nb] = data.tobytes()
        return b.EndVector()

    def small_vector(self, arr: np.ndarray, dtype: str) -> int:
        return self.b.CreateNumpyVector(np.ascontiguousarray(arr, dtype=dtype).reshape(-1))

    def string(self, s: str) -> int:
        return self.b.CreateString(s) if s else 0

    def tensor(self, tf: TensorFrame) -> int:
        check_tensor_frame(tf)
        b = self.b
        payload = self.big_vec if tf is self.big else self.payload(tf.payload)
        shape = self.small_vector(np.asarray(tf.shape, dtype=np.int64), "<i8")
        scales = self.small_vector(tf.scales, "<f4") if tf.scales is not None else 0
        zps = self.small_vector(tf.zero_points, "<i4") if tf.zero_points is not None else 0
        idx = self.small_vector(tf.indices, "<u4") if tf.indices is not None else 0
        b.StartObject(10)
        b.PrependUint8Slot(0, int(tf.dtype), 0)
        b.PrependUOffsetTRelativeSlot(1, shape, 0)
        b.PrependUint8Slot(2, int(tf.codec), 0)
        b.PrependUOffsetTRelativeSlot(3, payload, 0)
        if scales:
            b.PrependUOffsetTRelativeSlot(4, scales, 0)
        if zps:
            b.PrependUOffsetTRelativeSlot(5, zps, 0)
        b.PrependInt64Slot(6, int(tf.k), 0)
        b.PrependInt32Slot(7, int(tf.axis), 0)
        b.PrependUint8Slot(8, int(tf.orig_dtype), 0)
        if idx:
            b.PrependUOffsetTRelativeSlot(9, idx, 0)
        return b.EndObject()

    def output(self) -> bytes:
        b = self.b
        if self.big_data is None:
            return bytes(memoryview(b.Bytes)[b.head :])
        prefix = b.Bytes[b.head :]  # small copy; ends with the big vector's length prefix
        struct.pack_into("<I", prefix, len(prefix) - 4, self.big_data.size)
        return b"".join((prefix, self.big_data.data))


def _big_payload(frame: Any) -> TensorFrame | None:
    """The frame's largest tensor if it is worth appending instead of copying in."""
    best = None
    for name, kind, _ in _SPECS[type(frame)]:
        v = getattr(frame, name)
        if (
            kind.startswith("tensor")
            and isinstance(v, TensorFrame)
            and v.payload.nbytes >= _SPLICE_MIN
            and (best is None or v.payload.nbytes > best.payload.nbytes)
        ):
            best = v
    return best


def _size_hint(frame: Any, big: TensorFrame | None) -> int:
    n = 512
    for name, kind, _ in _SPECS[type(frame)]:
        v = getattr(frame, name)
        if kind.startswith("tensor") and v is not None:
            n += 128 + 8 * len(v.shape) + (v.nbytes - (v.payload.nbytes if big is not None and v is big else 0))
        elif kind == "str" or (kind == "f32[]" and v):
            n += 4 * len(v) + 8
        elif kind == "pad":
            n += int(v) + 32
    return n


def encode(envelope: Envelope) -> bytes:
    """Serialize an envelope. Raises ValueError/TypeError for values the schema can't hold."""
    frame = envelope.frame
    spec = _SPECS.get(type(frame))
    if spec is None:
        raise TypeError(f"not a frame: {type(frame).__name__}")
    big = _big_payload(frame)
    enc = _Encoder(_size_hint(frame, big), big)
    b = enc.b
    offsets: dict[str, int] = {}
    values: list[tuple[int, str, Any, Any]] = []
    for slot, (name, kind, default) in enumerate(spec):
        v = getattr(frame, name)
        if kind == "str":
            if not isinstance(v, str):
                raise TypeError(f"{type(frame).__name__}.{name} must be str")
            offsets[name] = enc.string(v)
        elif kind.startswith("tensor"):
            if v is None:
                if kind == "tensor":
                    raise ValueError(f"{type(frame).__name__}.{name} is required")
                offsets[name] = 0
            else:
                offsets[name] = enc.tensor(v)
        elif kind == "f32[]":
            offsets[name] = enc.small_vector(np.asarray(v, np.float32), "<f4") if v else 0
        elif kind == "pad":
            if not isinstance(v, int) or not 0 <= v <= MAX_PADDING:
                raise ValueError(f"{type(frame).__name__}.{name} must be an int in [0, {MAX_PADDING}], got {v!r}")
            offsets[name] = enc.payload(np.zeros(v, np.uint8)) if v else 0
        elif kind == "kind":
            if v not in WEIGHT_KINDS:
                raise ValueError(f"Weights.kind must be one of {WEIGHT_KINDS}, got {v!r}")
            values.append((slot, "B", WEIGHT_KINDS.index(v), default))
        elif kind == "ecode":
            values.append((slot, "H", int(ErrorCode(v)), default))
        elif kind == "?":
            values.append((slot, kind, bool(v), default))
        elif kind in "fd":
            values.append((slot, kind, float(v), float(default)))
        else:
            values.append((slot, kind, int(v), default))
    b.StartObject(len(spec))
    for slot, (name, _kind, _) in enumerate(spec):
        off = offsets.get(name)
        if off:
            b.PrependUOffsetTRelativeSlot(slot, off, 0)
    try:
        for slot, kind, v, default in values:
            getattr(b, _PREPEND[kind])(slot, v, default)
    except (TypeError, struct.error) as e:
        raise ValueError(f"{type(frame).__name__}: value out of range: {e}") from None
    frame_off = b.EndObject()
    major, minor = envelope.version
    b.StartObject(7)
    b.PrependUOffsetTRelativeSlot(6, frame_off, 0)
    try:
        b.PrependUint64Slot(2, int(envelope.session), 0)
        b.PrependUint64Slot(3, int(envelope.seq), 0)
        b.PrependInt64Slot(4, int(envelope.sent_ns), 0)
        b.PrependUint16Slot(0, int(major), 0)
        b.PrependUint16Slot(1, int(minor), 0)
    except (TypeError, struct.error) as e:
        raise ValueError(f"Envelope: value out of range: {e}") from None
    b.PrependUint8Slot(5, _TYPE_ID[type(frame)], 0)
    b.Finish(b.EndObject(), file_identifier=FILE_IDENTIFIER)
    return enc.output()


# ----------------------------------------------------------------------------- decode


def _malformed(msg: str) -> WireError:
    return WireError(ErrorCode.MALFORMED, msg)


class _Reader:
    """Bounds-checked access to one received buffer."""

    __slots__ = ("limits", "mv", "n")

    def __init__(self, mv: memoryview, limits: Limits) -> None:
        self.mv = mv
        self.n = len(mv)
        self.limits = limits

    def table(self, pos: int, what: str) -> tuple[int, int, int, int]:
        """Validate the table at `pos`; return (pos, vtable, vtable_len, object_len)."""
        n = self.n
        if pos > n - 4:
            raise _malformed(f"{what}: table offset {pos} outside the {n}-byte buffer")
        vt = pos - _I32.unpack_from(self.mv, pos)[0]
        if vt < 0 or vt > n - 4 or vt & 1:
            raise _malformed(f"{what}: bad vtable offset")
        vt_len, obj_len = _U16X2.unpack_from(self.mv, vt)
        if vt_len < 4 or vt_len & 1 or vt + vt_len > n or obj_len < 4 or pos + obj_len > n:
            raise _malformed(f"{what}: vtable or object size out of bounds")
        return pos, vt, vt_len, obj_len

    def field(self, tab: tuple[int, int, int, int], slot: int, size: int) -> int:
        """Absolute position of a field, or 0 if absent."""
        pos, vt, vt_len, obj_len = tab
        vo = 4 + 2 * slot
        if vo + 2 > vt_len:
            return 0
        o = _U16.unpack_from(self.mv, vt + vo)[0]
        if o == 0:
            return 0
        if o < 4 or o + size > obj_len:
            raise _malformed(f"field {slot} outside its table")
        return pos + o

    def scalar(self, tab, slot: int, kind: str, default):
        p = self.field(tab, slot, _SIZES[kind])
        if not p:
            return default
        v = _STRUCTS[kind].unpack_from(self.mv, p)[0]
        if kind == "?":
            b = self.mv[p]
            if b > 1:
                raise _malformed(f"bool field {slot} holds {b}")
        return v

    def target(self, tab, slot: int) -> int:
        """Follow the uoffset in `slot`; 0 if absent."""
        p = self.field(tab, slot, 4)
        if not p:
            return 0
        t = p + _U32.unpack_from(self.mv, p)[0]
        if t > self.n - 4:
            raise _malformed(f"offset in field {slot} points outside the buffer")
        return t

    def vector(self, tab, slot: int, itemsize: int, limit: int, what: str) -> tuple[int, int] | None:
        """(start, count) of a vector field after bounds and limit checks."""
        t = self.target(tab, slot)
        if not t:
            return None
        count = _U32.unpack_from(self.mv, t)[0]
        if count > limit:
            raise WireError(ErrorCode.LIMIT_EXCEEDED, f"{what}: {count} elements > limit {limit}")
        start = t + 4
        if count * itemsize > self.n - start:
            raise _malformed(f"{what}: {count} elements run past the end of the buffer")
        return start, count

    def array(self, tab, slot: int, dtype: str, limit: int, what: str) -> np.ndarray | None:
        dt = np.dtype(dtype)
        v = self.vector(tab, slot, dt.itemsize, limit, what)
        if v is None:
            return None
        return np.frombuffer(self.mv, dt, v[1], v[0])

    def string(self, tab, slot: int, what: str) -> str:
        v = self.vector(tab, slot, 1, self.limits.max_string_bytes, what)
        if v is None:
            return ""
        start, count = v
        try:
            return str(self.mv[start : start + count], "utf-8")
        except UnicodeDecodeError:
            raise _malformed(f"{what}: not valid UTF-8") from None

    def enum(self, tab, slot: int, kind: str, enum_cls, what: str):
        v = self.scalar(tab, slot, kind, 0)
        try:
            return enum_cls(v)
        except ValueError:
            raise _malformed(f"{what}: unknown value {v}") from None

    def tensor(self, tab_pos: int, what: str) -> TensorFrame:
        lim = self.limits
        tab = self.table(tab_pos, what)
        dtype = self.enum(tab, 0, "B", DType, f"{what}.dtype")
        codec = self.enum(tab, 2, "B", Codec, f"{what}.codec")
        orig = self.enum(tab, 8, "B", DType, f"{what}.orig_dtype")
        sv = self.vector(tab, 1, 8, lim.max_rank, f"{what}.shape")
        if sv is None:
            raise _malformed(f"{what}.shape is required")
        shape = tuple(int(d) for d in np.frombuffer(self.mv, "<i8", sv[1], sv[0]))
        pv = self.vector(tab, 3, 1, self.n, f"{what}.payload")
        if pv is None:
            raise _malformed(f"{what}.payload is required")
        item = dtype.itemsize
        if pv[1] % item:
            raise WireError(ErrorCode.BAD_TENSOR, f"{what}: {pv[1]} payload bytes is not a whole number of {dtype.name}")
        payload = np.frombuffer(self.mv, dtype.numpy, pv[1] // item, pv[0])
        tf = TensorFrame(
            dtype=dtype,
            shape=shape,
            codec=codec,
            payload=payload,
            scales=self.array(tab, 4, "<f4", lim.max_list_len, f"{what}.scales"),
            zero_points=self.array(tab, 5, "<i4", lim.max_list_len, f"{what}.zero_points"),
            k=self.scalar(tab, 6, "q", 0),
            axis=self.scalar(tab, 7, "i", 0),
            orig_dtype=orig,
            indices=self.array(tab, 9, "<u4", lim.max_elements, f"{what}.indices"),
        )
        check_tensor_frame(tf, lim.max_elements)
        return tf


def _to_memoryview(buf) -> memoryview:
    try:
        mv = memoryview(buf)
    except TypeError:
        raise _malformed(f"cannot decode a {type(buf).__name__}") from None
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        try:
            mv = mv.cast("B")
        except (TypeError, ValueError):
            raise _malformed("buffer must be contiguous bytes") from None
    elif mv.format != "B":
        mv = mv.cast("B")
    return mv


def decode(buf, limits: Limits = Limits()) -> Envelope:
    """Parse and validate one frame; raise `WireError` and nothing else."""
    mv = _to_memoryview(buf)
    try:
        return _decode(mv, limits)
    except WireError:
        raise
    except Exception as e:
        raise WireError(ErrorCode.MALFORMED, f"unexpected decoder failure ({type(e).__name__}: {e})") from e


def _decode(mv: memoryview, limits: Limits) -> Envelope:
    n = len(mv)
    if n > limits.max_frame_bytes:
        raise WireError(ErrorCode.LIMIT_EXCEEDED, f"frame of {n} bytes > limit {limits.max_frame_bytes}")
    if n < 8 or mv[4:8] != FILE_IDENTIFIER:
        raise WireError(ErrorCode.BAD_IDENTIFIER, "not a splitreplay frame (identifier SRW1 missing)")
    r = _Reader(mv, limits)
    env = r.table(_U32.unpack_from(mv, 0)[0], "Envelope")
    major = r.scalar(env, 0, "H", 0)
    minor = r.scalar(env, 1, "H", 0)
    if major != PROTOCOL_VERSION.major:
        raise WireError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"peer speaks protocol {major}.{minor}, this build speaks "
            f"{PROTOCOL_VERSION.major}.x ({PROTOCOL_VERSION.major}.{PROTOCOL_VERSION.minor})",
        )
    session = r.scalar(env, 2, "Q", 0)
    seq = r.scalar(env, 3, "Q", 0)
    sent_ns = r.scalar(env, 4, "q", 0)
    ftype = r.scalar(env, 5, "B", 0)
    if ftype == 0:
        raise _malformed("Envelope.frame is required")
    if ftype > len(FRAME_TYPES):
        if minor > PROTOCOL_VERSION.minor:
            raise WireError(ErrorCode.UNSUPPORTED_VERSION, f"frame type {ftype} from newer protocol {major}.{minor}")
        raise _malformed(f"unknown frame type {ftype}")
    fpos = r.target(env, 6)
    if not fpos:
        raise _malformed("Envelope.frame is required")
    cls = FRAME_TYPES[ftype - 1]
    name = cls.__name__
    tab = r.table(fpos, name)
    kw: dict[str, Any] = {}
    for slot, (attr, kind, default) in enumerate(_SPECS[cls]):
        what = f"{name}.{attr}"
        if kind == "str":
            kw[attr] = r.string(tab, slot, what)
        elif kind == "tensor" or kind == "tensor?":
            t = r.target(tab, slot)
            if not t:
                if kind == "tensor":
                    raise _malformed(f"{what} is required")
                kw[attr] = None
            else:
                kw[attr] = r.tensor(t, what)
        elif kind == "f32[]":
            a = r.array(tab, slot, "<f4", limits.max_list_len, what)
            kw[attr] = [] if a is None else a.tolist()
        elif kind == "pad":
            pad = r.vector(tab, slot, 1, MAX_PADDING, what)
            kw[attr] = 0 if pad is None else pad[1]
        elif kind == "kind":
            v = r.scalar(tab, slot, "B", 0)
            if v >= len(WEIGHT_KINDS):
                raise _malformed(f"{what}: unknown value {v}")
            kw[attr] = WEIGHT_KINDS[v]
        elif kind == "ecode":
            kw[attr] = r.enum(tab, slot, "H", ErrorCode, what)
        else:
            kw[attr] = r.scalar(tab, slot, kind, default)
    return Envelope(cls(**kw), session=session, seq=seq, sent_ns=sent_ns, version=ProtocolVersion(major, minor))
