"""Tensor codecs: how cut-layer features and their gradients are compressed.

Both sides use this module: the edge encodes features (and keeps the
quantization error for error feedback), the cloud decodes them and encodes the
feature gradients going down. `encode_tensor` returns the frame *and* the error
``decode(encode(x)) - x`` because the error-feedback correction needs exactly
that term; computing it here, from the already-quantized values, is cheaper
than decoding again.

Codecs (`Codec` mirrors ``enum Codec`` in frames.fbs):

============  =====  ========================================================
codec         label  payload
============  =====  ========================================================
NONE          fp32   the values, lossless, in their own dtype
FP16          fp16   IEEE half; finite values beyond +-65504 saturate
BF16          bf16   bfloat16 words (round to nearest even)
INT8_TENSOR   int8   affine int8, one (scale, zero point)
INT8_CHANNEL  int8c  affine int8, one (scale, zero point) per channel of `axis`
INT4          int4   affine 4-bit codes 0..15, two per byte (low nibble
                     first), per channel of `axis`
TOPK          topk   float32 values of the k largest magnitudes + uint32 flat
                     indices; everything else decodes to 0
============  =====  ========================================================

Affine quantization: the range is widened to include 0 (so 0 and zero padding
are exact and a constant tensor gets a non-zero range), ``scale = (hi-lo) /
(qmax-qmin)``, ``zero_point = round(qmin - lo/scale)``, ``q = clamp(round(x/scale)
+ zero_point)``. Every element then reconstructs within ``scale/2`` (deterministic
rounding) or within ``scale`` (stochastic rounding, ``stochastic=True``, an
unbiased option meant for gradients). An all-zero channel gets scale 1.
When `axis` is not a dimension of the tensor (a 0-d or 1-d tensor with the
default ``axis=1``), the per-channel codecs fall back to one channel and
record ``axis = -1``.

NaN/Inf policy: ``NONE`` is lossless and carries any value. Every lossy codec
rejects non-finite input with `NonFiniteError` (a ``ValueError``). A NaN or Inf
in features or gradients means training has already diverged; quantizing it
would silently poison the scale of a whole channel, the error-feedback term and
the peer's optimizer, so the sender fails loudly at the source instead. The
check is free for the quantizing codecs (the min/max they need propagate NaN)
and a SIMD min + max over the input for fp16/bf16/top-k. On the decoding side,
`check_tensor_frame` rejects non-finite or non-positive scales and
out-of-range zero points and indices with `WireError(BAD_TENSOR)`; payload
*values* of float dtypes are not scanned (that would cost a pass over every
frame) and are trusted like any IEEE data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from .errors import ErrorCode, WireError

TorchDType = torch.dtype  # the DType.torch property shadows the module inside the class

__all__ = [
    "Codec",
    "DType",
    "NonFiniteError",
    "TensorFrame",
    "check_tensor_frame",
    "decode_tensor",
    "encode_tensor",
    "encoded_nbytes",
    "num_elements",
    "tensor_frame_from_array",
    "tensor_frame_from_tensor",
    "tensor_to_numpy",
]


class NonFiniteError(ValueError):
    """A lossy codec was asked to encode NaN or Inf (see the module policy)."""


class Codec(IntEnum):
    """Tensor codec ids, value for value as ``enum Codec`` in frames.fbs."""

    NONE = 0
    FP16 = 1
    BF16 = 2
    INT8_TENSOR = 3
    INT8_CHANNEL = 4
    INT4 = 5
    TOPK = 6

    @classmethod
    def parse(cls, name: str | int | Codec) -> Codec:
        """Codec from a short label ("fp32", "int8c", ...), an enum name or an id."""
        if isinstance(name, Codec):
            return name
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            try:
                return cls(int(name))
            except ValueError:
                pass
        elif isinstance(name, str):
            key = name.strip().lower()
            if key in _PARSE:
                return _PARSE[key]
            if key.upper() in cls.__members__:
                return cls[key.upper()]
        choices = ", ".join(repr(c) for c in _PARSE)
        raise ValueError(f"unknown codec {name!r}; choose one of {choices}")

    @property
    def label(self) -> str:
        """Short name used on the command line and in frames' codec strings."""
        return _LABELS[self]


_LABELS = {
    Codec.NONE: "fp32",
    Codec.FP16: "fp16",
    Codec.BF16: "bf16",
    Codec.INT8_TENSOR: "int8",
    Codec.INT8_CHANNEL: "int8c",
    Codec.INT4: "int4",
    Codec.TOPK: "topk",
}
_PARSE = {"fp32": Codec.NONE, "none": Codec.NONE, **{v: k for k, v in _LABELS.items()}}
#: every codec's label, lossless first and most aggressive last (the CLIs' choices)
LABELS: tuple[str, ...] = tuple(_LABELS.values())


class DType(IntEnum):
    """Payload element types, value for value as ``enum DType`` in frames.fbs."""

    F32 = 0
    F16 = 1
    BF16 = 2
    I8 = 3
    U8 = 4
    I32 = 5
    I64 = 6
    F64 = 7
    BOOL = 8
    I16 = 9

    @property
    def numpy(self) -> np.dtype:
        """Storage dtype of the payload (bf16 is stored as raw uint16 words)."""
        return _NP[self]

    @property
    def itemsize(self) -> int:
        return _NP[self].itemsize

    @property
    def torch(self) -> TorchDType:
        return _TORCH[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F16, DType.BF16, DType.F64)

    @classmethod
    def from_torch(cls, dt: TorchDType) -> DType:
        try:
            return _FROM_TORCH[dt]
        except KeyError:
            raise ValueError(f"unsupported tensor dtype {dt}; supported: {sorted(str(d) for d in _FROM_TORCH)}") from None

    @classmethod
    def from_numpy(cls, dt: np.dtype) -> DType:
        try:
            return _FROM_NP[np.dtype(dt)]
        except KeyError:
            raise ValueError(f"unsupported array dtype {dt}") from None


_NP: dict[DType, np.dtype] = {
    DType.F32: np.dtype("<f4"),
    DType.F16: np.dtype("<f2"),
    DType.BF16: np.dtype("<u2"),
    DType.I8: np.dtype("i1"),
    DType.U8: np.dtype("u1"),
    DType.I32: np.dtype("<i4"),
    DType.I64: np.dtype("<i8"),
    DType.F64: np.dtype("<f8"),
    DType.BOOL: np.dtype("?"),
    DType.I16: np.dtype("<i2"),
}
_TORCH = {
    DType.F32: torch.float32,
    DType.F16: torch.float16,
    DType.BF16: torch.bfloat16,
    DType.I8: torch.int8,
    DType.U8: torch.uint8,
    DType.I32: torch.int32,
    DType.I64: torch.int64,
    DType.F64: torch.float64,
    DType.BOOL: torch.bool,
    DType.I16: torch.int16,
}
_FROM_TORCH = {v: k for k, v in _TORCH.items()}
_FROM_NP = {v: k for k, v in _NP.items() if k is not DType.BF16}

#: payload dtype each lossy codec must carry (NONE carries any dtype).
CODEC_PAYLOAD_DTYPE = {
    Codec.FP16: DType.F16,
    Codec.BF16: DType.BF16,
    Codec.INT8_TENSOR: DType.I8,
    Codec.INT8_CHANNEL: DType.I8,
    Codec.INT4: DType.U8,
    Codec.TOPK: DType.F32,
}
_QRANGE = {Codec.INT8_TENSOR: (-128, 127), Codec.INT8_CHANNEL: (-128, 127), Codec.INT4: (0, 15)}
_FP16_MAX = 65504.0
_BF16_MAX = 3.3895313892515355e38


@dataclass(eq=False)
class TensorFrame:
    """One encoded tensor as it travels in a ``Tensor`` table.

    `payload` is a 1-D numpy array in `dtype`'s storage type; after decoding it
    is a view over the received buffer. After encoding it may share memory
    with the source tensor (codec NONE), so encode the frame before mutating
    the tensor in place.
    """

    dtype: DType
    shape: tuple[int, ...]
    codec: Codec
    payload: np.ndarray
    scales: np.ndarray | None = None  # float32, per channel (or 1)
    zero_points: np.ndarray | None = None  # int32, like scales
    k: int = 0  # TOPK: kept values
    axis: int = 0  # channel axis, -1: one channel
    orig_dtype: DType = DType.F32  # what decode_tensor returns for lossy codecs
    indices: np.ndarray | None = None  # TOPK: uint32 flat indices

    @property
    def numel(self) -> int:
        return num_elements(self.shape)

    @property
    def nbytes(self) -> int:
        """Payload plus codec parameter bytes (what `encoded_nbytes` predicts)."""
        n = self.payload.nbytes
        for a in (self.scales, self.zero_points, self.indices):
            if a is not None:
                n += a.nbytes
        return n


def num_elements(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ----------------------------------------------------------------------------- encode


def encode_tensor(
    x: torch.Tensor,
    codec: Codec | str = Codec.NONE,
    *,
    topk_ratio: float = 0.1,
    axis: int = 1,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[TensorFrame, torch.Tensor]:
    """Encode `x`; return ``(frame, error)`` with ``error = decode(frame) - x`` (float32).

    `stochastic` (int8/int4 codecs) rounds up with probability equal to the
    fractional part, which makes the quantizer unbiased (for gradients);
    `generator` makes it reproducible.
    """
    codec = Codec.parse(codec)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"encode_tensor expects a torch.Tensor, got {type(x).__name__}")
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    if codec is Codec.NONE:
        tf = tensor_frame_from_tensor(x)
        # calloc'd numpy zeros: the OS hands out zero pages lazily, far cheaper than a fill
        return tf, torch.from_numpy(np.zeros(tuple(x.shape), np.float32))
    if not x.is_floating_point():
        raise ValueError(f"codec {codec.label} needs a floating-point tensor, got {x.dtype}")
    orig = DType.from_torch(x.dtype)
    shape = tuple(x.shape)
    xf = x.float().contiguous()  # no copy for contiguous float32 input
    if codec is Codec.FP16 or codec is Codec.BF16:
        return _encode_half(xf, codec, shape, orig)
    if codec is Codec.TOPK:
        return _encode_topk(xf, shape, orig, topk_ratio)
    return _encode_affine(xf, codec, shape, orig, axis, stochastic, generator)


def _require_finite(lo: float, hi: float, codec: Codec) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NonFiniteError(f"codec {codec.label} cannot encode NaN/Inf values; training has diverged or the input is corrupt")


def _encode_half(xf: torch.Tensor, codec: Codec, shape, orig: DType):
    xn = xf.numpy().reshape(-1)
    if xn.size:
        _require_finite(float(xn.min()), float(xn.max()), codec)  # NaN propagates
    if codec is Codec.FP16:
        # torch, not numpy: numpy converts float32 <-> float16 in software, ~12x
        # slower here (32k elements: 100 us vs 8 us; it was a fifth of a busy
        # server's CPU). Both round to nearest even; the clamp keeps it finite.
        half = xf.reshape(-1).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        err = half.float()
        err -= xf.reshape(-1)
        return TensorFrame(DType.F16, shape, codec, half.numpy(), orig_dtype=orig), err.reshape(shape)
    else:
        # round to nearest even on the raw bits (inputs are finite and clamped,
        # so the carry can never reach the exponent's all-ones pattern)
        bits = np.clip(xn, -_BF16_MAX, _BF16_MAX).view(np.uint32)
        lsb = bits >> 16
        lsb &= 1
        lsb += 0x7FFF
        lsb += bits
        lsb >>= 16
        payload = lsb.astype(np.uint16)
        lsb <<= 16
        err = lsb.view(np.float32)
        dt = DType.BF16
    err -= xn
    return TensorFrame(dt, shape, codec, payload, orig_dtype=orig), torch.from_numpy(err).reshape(shape)


def _encode_topk(xf: torch.Tensor, shape, orig: DType, ratio: float):
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"topk_ratio must be in (0, 1], got {ratio}")
    flat = xf.reshape(-1)
    n = flat.numel()
    if n >= 2**32:
        raise ValueError("top-k indices are uint32: tensor too large")
    k = topk_count(n, ratio)
    fn = flat.numpy()
    if n:
        _require_finite(float(fn.min()), float(fn.max()), Codec.TOPK)
    if k == 0:
        idx = np.zeros(0, np.int64)
    elif k == n:
        idx = np.arange(n)
    else:  # O(n) selection (numpy introselect), ~5x faster than torch.topk here
        idx = np.argpartition(np.abs(fn), n - k)[n - k :]
    idx = np.sort(idx)  # ascending: sequential scatter on decode, canonical bytes
    vals = fn[idx]
    err = -fn  # new array
    err[idx] = 0.0
    tf = TensorFrame(DType.F32, shape, Codec.TOPK, vals, k=k, orig_dtype=orig, indices=idx.astype(np.uint32))
    return tf, torch.from_numpy(err).reshape(shape)


def topk_count(n: int, ratio: float) -> int:
    """How many values top-k keeps of `n`: round(ratio*n), at least 1 if n > 0."""
    return 0 if n == 0 else min(n, max(1, int(round(ratio * n))))


def _channel_view(shape, axis: int) -> tuple[int, int, int, int]:
    """(N, C, M, axis) such that the tensor reshapes to (N, C, M); axis -1: C = 1."""
    nd = len(shape)
    if -nd <= axis < nd and nd > 1:
        axis %= nd
        c = int(shape[axis])
        return num_elements(shape[:axis]), c, num_elements(shape[axis + 1 :]), axis
    return 1, 1, num_elements(shape), -1


def _encode_affine(
    xf: torch.Tensor, codec: Codec, shape, orig: DType, axis: int, stochastic: bool, generator: torch.Generator | None
):
    # All in numpy, in place: single-threaded (torch's intra-op threads contend
    # badly on a loaded 2-core device), faster than torch at broadcasting a
    # per-channel (1, C, 1) operand, and an exact division keeps the scale/2 bound.
    qmin, qmax = _QRANGE[codec]
    if codec is Codec.INT8_TENSOR:
        n_, c, m, ax = 1, 1, xf.numel(), -1
    else:
        n_, c, m, ax = _channel_view(shape, axis)
    xn = xf.numpy().reshape(n_, c, m)
    if xn.size:
        # reduce the contiguous axis first (SIMD), then the outer one; NaN propagates
        lo = np.minimum(xn.min(axis=2).min(axis=0), np.float32(0))
        hi = np.maximum(xn.max(axis=2).max(axis=0), np.float32(0))
        _require_finite(float(lo.min()), float(hi.max()), codec)
    else:
        lo = hi = np.zeros(c, np.float32)
    scale = (hi - lo) / np.float32(qmax - qmin)
    scale[~(scale > 0)] = 1.0
    zp = np.clip(np.rint(np.float32(qmin) - lo / scale), qmin, qmax).astype(np.float32)
    s3, z3 = scale.reshape(1, c, 1), zp.reshape(1, c, 1)
    v = np.divide(xn, s3)
    v += z3
    if stochastic:
        v += torch.rand(v.shape, generator=generator).numpy()
        np.floor(v, out=v)
    else:
        np.rint(v, out=v)
    np.maximum(v, qmin, out=v)
    np.minimum(v, qmax, out=v)
    if codec is Codec.INT4:
        q = v.astype(np.uint8).reshape(-1)
        if q.size % 2:
            q = np.append(q, np.uint8(0))
        payload = q[0::2] | (q[1::2] << 4)
    else:
        payload = v.astype(np.int8).reshape(-1)
    v -= z3  # v becomes the error term in place: (q - zp) * scale - x
    v *= s3
    v -= xn
    tf = TensorFrame(
        CODEC_PAYLOAD_DTYPE[codec],
        shape,
        codec,
        payload,
        scales=scale.astype(np.float32),
        zero_points=zp.astype(np.int32),
        axis=ax,
        orig_dtype=orig,
    )
    return tf, torch.from_numpy(v).reshape(shape)


def tensor_frame_from_tensor(x: torch.Tensor) -> TensorFrame:
    """Lossless frame (codec NONE) for any supported dtype; no copy if contiguous."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    dt = DType.from_torch(x.dtype)
    flat = x.contiguous().reshape(-1)
    if dt is DType.BF16:
        flat = flat.view(torch.uint16)
    return TensorFrame(dt, tuple(x.shape), Codec.NONE, flat.numpy(), orig_dtype=dt)


def tensor_frame_from_array(arr: np.ndarray) -> TensorFrame:
    """Lossless frame (codec NONE) for a numpy array (labels, int state, ...)."""
    arr = np.asarray(arr)
    dt = DType.from_numpy(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
    flat = np.ascontiguousarray(arr, dtype=dt.numpy).reshape(-1)
    return TensorFrame(dt, tuple(int(d) for d in arr.shape), Codec.NONE, flat, orig_dtype=dt)


def encoded_nbytes(shape, codec: Codec | str, *, topk_ratio: float = 0.1, axis: int = 1) -> int:
    """Predicted payload + codec parameter bytes of a float32 tensor of `shape`.

    Exactly `TensorFrame.nbytes` of what `encode_tensor` produces for float32
    input; the frame envelope adds a small constant (see
    ``schemas.frames.TENSOR_OVERHEAD_BYTES``).
    """
    codec = Codec.parse(codec)
    n = num_elements(shape)
    if codec is Codec.NONE:
        return 4 * n
    if codec in (Codec.FP16, Codec.BF16):
        return 2 * n
    if codec is Codec.TOPK:
        return 8 * topk_count(n, topk_ratio)
    c = 1 if codec is Codec.INT8_TENSOR else _channel_view(tuple(shape), axis)[1]
    data = n if codec is not Codec.INT4 else (n + 1) // 2
    return data + 8 * c


# ----------------------------------------------------------------------------- decode


def _torch_view(arr: np.ndarray) -> torch.Tensor:
    """torch tensor over a writable array, or over a private copy of a read-only one.

    A received ``bytes`` object is immutable; handing torch a writable alias of
    it would let an in-place op corrupt Python's immutable object.
    """
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def decode_tensor(tf: TensorFrame) -> torch.Tensor:
    """Reconstruct the tensor: native dtype for NONE, `orig_dtype` for lossy codecs."""
    codec = tf.codec
    shape = tuple(tf.shape)
    if codec is Codec.NONE:
        t = _torch_view(tf.payload.reshape(-1))
        if tf.dtype is DType.BF16:
            t = t.view(torch.bfloat16)
        return t.reshape(shape)
    if codec is Codec.FP16:
        out = _torch_view(tf.payload).float()  # torch's conversion (see `_encode_half`)
    elif codec is Codec.BF16:
        w = tf.payload.astype(np.uint32)
        w <<= 16
        out = torch.from_numpy(w.view(np.float32))
    elif codec is Codec.TOPK:
        assert tf.indices is not None  # check_tensor_frame ran at decode
        flat = np.zeros(num_elements(shape), np.float32)
        flat[tf.indices.astype(np.intp)] = tf.payload
        out = torch.from_numpy(flat)
    else:
        n = num_elements(shape)
        n_, c, m, _ = _channel_view(shape, tf.axis) if tf.axis >= 0 else (1, 1, n, -1)
        if codec is Codec.INT4:
            p = tf.payload
            q = np.empty(2 * p.size, np.float32)
            q[0::2] = p & 15
            q[1::2] = p >> 4
            q = q[:n]
        else:
            q = tf.payload.astype(np.float32)
        assert tf.zero_points is not None and tf.scales is not None  # check_tensor_frame ran at decode
        q3 = q.reshape(n_, c, m)
        q3 -= tf.zero_points.astype(np.float32).reshape(1, -1, 1)
        q3 *= tf.scales.reshape(1, -1, 1)
        out = torch.from_numpy(q3)
    out = out.reshape(shape)
    orig = tf.orig_dtype if tf.orig_dtype.is_float else DType.F32
    return out if orig is DType.F32 else out.to(orig.torch)


def tensor_to_numpy(tf: TensorFrame) -> np.ndarray:
    """Values as numpy: a zero-copy view for lossless frames (bf16 widens to f32)."""
    if tf.codec is Codec.NONE and tf.dtype is not DType.BF16:
        return tf.payload.reshape(tuple(tf.shape))
    t = decode_tensor(tf)
    if t.dtype is torch.bfloat16:
        t = t.float()
    return t.numpy()


# ----------------------------------------------------------------------------- validation


def check_tensor_frame(tf: TensorFrame, max_elements: int = 1 << 31) -> None:
    """Raise `WireError(BAD_TENSOR)` unless metadata, parameters and payload agree.

    Costs O(rank + channels + k), never a pass over the payload; the decoder
    calls it before anything is allocated from the frame's claims.
    """

    def bad(msg: str) -> WireError:
        return WireError(ErrorCode.BAD_TENSOR, msg)

    shape = tf.shape
    for d in shape:
        if d < 0:
            raise bad(f"negative dimension in shape {tuple(shape)}")
    n = num_elements(shape)
    if n > max_elements:
        raise WireError(ErrorCode.LIMIT_EXCEEDED, f"tensor has {n} elements > limit {max_elements}")
    codec = tf.codec
    payload = tf.payload
    if payload.ndim != 1 or payload.dtype != tf.dtype.numpy:
        raise bad("payload must be a 1-D array of the frame's dtype")
    if codec is not Codec.NONE:
        want = CODEC_PAYLOAD_DTYPE[codec]
        if tf.dtype is not want:
            raise bad(f"codec {codec.label} carries {want.name}, frame says {tf.dtype.name}")
        if not tf.orig_dtype.is_float:
            raise bad(f"lossy codec with non-float original dtype {tf.orig_dtype.name}")
    if codec is Codec.TOPK:
        k = tf.k
        if not 0 <= k <= n:
            raise bad(f"top-k keeps {k} of {n} elements")
        if payload.size != k or tf.indices is None or tf.indices.size != k:
            raise bad("top-k values/indices length differs from k")
        if k and int(tf.indices.max()) >= n:
            raise bad("top-k index out of range")
        return
    expect = (n + 1) // 2 if codec is Codec.INT4 else n
    if payload.size != expect:
        raise bad(f"payload has {payload.size} elements, shape {tuple(shape)} with codec {codec.label} needs {expect}")
    if codec in _QRANGE:
        if codec is Codec.INT8_TENSOR or tf.axis == -1:
            channels = 1
        elif 0 <= tf.axis < len(shape) and len(shape) > 1:
            channels = int(shape[tf.axis])
        else:
            raise bad(f"channel axis {tf.axis} invalid for rank {len(shape)}")
        s, z = tf.scales, tf.zero_points
        if s is None or z is None or s.size != channels or z.size != channels:
            raise bad(f"need {channels} scales and zero points")
        if channels:
            if not (np.isfinite(s).all() and (s > 0).all()):
                raise bad("scales must be finite and positive")
            qmin, qmax = _QRANGE[codec]
            if int(z.min()) < qmin or int(z.max()) > qmax:
                raise bad(f"zero point outside [{qmin}, {qmax}]")
