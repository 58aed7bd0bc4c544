"""Typed frames: round trips, zero-copy payloads, and every validation rule of `decode`."""

from __future__ import annotations

import json
import struct
from dataclasses import fields
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
import torch

import schemas
from schemas.codecs import Codec, DType, TensorFrame, decode_tensor, encode_tensor, tensor_frame_from_array
from schemas.errors import ErrorCode, WireError
from schemas.frames import (
    FRAME_TYPES,
    PROTOCOL_VERSION,
    TENSOR_OVERHEAD_BYTES,
    Bye,
    Envelope,
    Features,
    Gradients,
    Limits,
    ProtocolVersion,
    Weights,
    decode,
    encode,
)
from schemas.samples import sample_envelopes

FIXTURES = Path(schemas.__file__).parent / "fixtures"


def assert_tensor_equal(a: TensorFrame, b: TensorFrame) -> None:
    assert (a.dtype, tuple(a.shape), a.codec, a.k, a.orig_dtype) == (b.dtype, tuple(b.shape), b.codec, b.k, b.orig_dtype)
    np.testing.assert_array_equal(a.payload, b.payload)
    for name in ("scales", "zero_points", "indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y)
    if a.codec in (Codec.INT8_CHANNEL, Codec.INT4):
        assert a.axis == b.axis


def assert_frame_equal(a, b) -> None:
    assert type(a) is type(b)
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, TensorFrame) or isinstance(y, TensorFrame):
            assert x is not None and y is not None, f.name
            assert_tensor_equal(x, y)
        elif isinstance(x, float) or (isinstance(x, list) and x and isinstance(x[0], float)):
            assert y == pytest.approx(x, rel=1e-6), f.name  # float32 fields round
        else:
            assert x == y, f.name


# ----------------------------------------------------------------------------- round trips


def test_every_frame_type_is_covered():
    assert {type(e.frame) for e in sample_envelopes()} == set(FRAME_TYPES)


@pytest.mark.parametrize("env", sample_envelopes(), ids=lambda e: type(e.frame).__name__)
def test_round_trip_every_frame(env):
    buf = encode(env)
    assert isinstance(buf, bytes) and buf[4:8] == b"SRW1"
    out = decode(buf)
    assert (out.session, out.seq, out.sent_ns, out.version) == (env.session, env.seq, env.sent_ns, PROTOCOL_VERSION)
    assert_frame_equal(env.frame, out.frame)


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("shape", [(0,), (3, 0, 5), (), (1,), (2, 3, 4, 5)])
def test_round_trip_every_codec_through_frames(codec, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    tf, err = encode_tensor(x, codec)
    out = decode(encode(Envelope(Features(step=1, epoch=0, point=1, tensor=tf))))
    got = decode_tensor(out.frame.tensor)
    torch.testing.assert_close(got, x + err, atol=1e-6, rtol=0)
    assert out.frame.tensor.nbytes == tf.nbytes


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "sliced"])
def test_decode_accepts_bytes_like(kind):
    env = sample_envelopes()[2]
    buf = encode(env)
    src = {
        "bytes": buf,
        "bytearray": bytearray(buf),
        "memoryview": memoryview(buf),
        "sliced": memoryview(b"xx" + buf + b"yy")[2:-2],
    }[kind]
    assert_frame_equal(env.frame, decode(src).frame)


def test_defaults_and_optional_fields():
    tf = tensor_frame_from_array(np.zeros((2, 2), np.float32))
    out = decode(encode(Envelope(Gradients(step=3)))).frame
    assert out.tensor is None and out.loss == 0.0 and out.count == 0
    f = decode(encode(Envelope(Features(step=1, epoch=0, point=0, tensor=tf)))).frame
    assert f.labels is None and f.train is True and f.grad_codec == ""
    w = decode(encode(Envelope(Weights(step=0, name="w", kind="buffer", tensor=tf)))).frame
    assert (w.kind, w.chunk, w.chunks, w.last, w.block) == ("buffer", 0, 1, False, -1)


def test_encode_rejects_bad_values():
    tf = tensor_frame_from_array(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="kind"):
        encode(Envelope(Weights(step=0, name="w", kind="gradient", tensor=tf)))
    with pytest.raises(ValueError, match="required"):
        encode(Envelope(Features(step=0, epoch=0, point=0, tensor=None)))
    with pytest.raises(ValueError, match="out of range"):
        encode(Envelope(Bye("x"), session=-1))
    with pytest.raises(TypeError):
        encode(Envelope(object()))


# ----------------------------------------------------------------------------- zero copy


def test_decoded_payload_is_a_view_of_the_received_buffer():
    x = torch.randn(32, 64, 8, 8)
    tf, _ = encode_tensor(x, Codec.NONE)
    buf = encode(Envelope(Features(step=1, epoch=0, point=2, tensor=tf)))
    out = decode(buf).frame.tensor
    whole = np.frombuffer(buf, np.uint8)
    assert np.shares_memory(out.payload, whole)
    base = out.payload
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, memoryview) and base.obj is buf
    assert out.payload.ctypes.data % 16 == np.frombuffer(buf, np.uint8).ctypes.data % 16  # aligned in-buffer
    offset = out.payload.ctypes.data - whole.ctypes.data
    assert offset % 16 == 0
    np.testing.assert_array_equal(out.payload, x.numpy().reshape(-1))
    # the frame adds only a small constant around the payload
    assert len(buf) - tf.nbytes <= TENSOR_OVERHEAD_BYTES


def test_writable_buffer_decodes_to_torch_without_copy():
    x = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    buf = bytearray(encode(Envelope(Features(step=1, epoch=0, point=2, tensor=encode_tensor(x, "fp32")[0]))))
    t = decode_tensor(decode(buf).frame.tensor)
    assert torch.equal(t, x)
    assert np.shares_memory(t.numpy(), np.frombuffer(buf, np.uint8))
    # from immutable bytes the tensor is a private copy (no writable alias of a bytes object)
    t2 = decode_tensor(decode(bytes(buf)).frame.tensor)
    t2 += 1
    assert torch.equal(decode_tensor(decode(bytes(buf)).frame.tensor), x)


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.float64, np.int16])
def test_payload_views_are_aligned(dtype):
    for n in (1, 3, 17, 1000, 5000):
        tf = tensor_frame_from_array(np.arange(n).astype(dtype))
        buf = encode(Envelope(Features(step=n, epoch=0, point=0, tensor=tf, labels=tf)))
        out = decode(buf).frame
        start = np.frombuffer(buf, np.uint8).ctypes.data
        for t in (out.tensor, out.labels):
            assert (t.payload.ctypes.data - start) % 16 == 0
            assert t.payload.flags.aligned


# ----------------------------------------------------------------------------- fixtures


def _to_json(env: Envelope) -> dict:
    f = env.frame
    out = {"type": type(f).__name__}
    for fld in fields(f):
        v = getattr(f, fld.name)
        if isinstance(v, TensorFrame):
            v = {
                "dtype": v.dtype.name,
                "shape": list(v.shape),
                "codec": v.codec.name,
                "axis": v.axis,
                "payload": v.payload.tolist(),
                "scales": v.scales.tolist(),
                "zero_points": v.zero_points.tolist(),
            }
        out[fld.name] = v
    return {"session": env.session, "seq": env.seq, "sent_ns": env.sent_ns, "version": list(env.version), "frame": out}


@pytest.mark.parametrize("name", ["features_v1_0", "hello_v1_0"])
def test_frozen_fixtures_keep_decoding(name):
    buf = (FIXTURES / f"{name}.bin").read_bytes()
    expect = json.loads((FIXTURES / f"{name}.json").read_text())
    got = _to_json(decode(buf))
    appended = {k: got["frame"].pop(k) for k in list(got["frame"]) if k not in expect["frame"]}
    assert got == expect
    # fields appended after the fixture was written decode at their defaults (old behaviour)
    cls = type(decode(buf).frame)
    defaults = {f.name: f.default for f in fields(cls)}
    assert appended == {k: defaults[k] for k in appended}


def test_old_features_fixture_lacks_the_appended_fields():
    """The fixture must stay an *old* frame: Features' vtable has 4 of today's 7 slots."""
    buf = (FIXTURES / "features_v1_0.bin").read_bytes()
    root = struct.unpack_from("<I", buf, 0)[0]
    vt = root - struct.unpack_from("<i", buf, root)[0]
    frame_slot = struct.unpack_from("<H", buf, vt + 4 + 2 * 6)[0]
    fpos = root + frame_slot + struct.unpack_from("<I", buf, root + frame_slot)[0]
    fvt = fpos - struct.unpack_from("<i", buf, fpos)[0]
    assert struct.unpack_from("<H", buf, fvt)[0] == 4 + 2 * 4
    assert len(Features.__dataclass_fields__) == 7


# ----------------------------------------------------------------------------- validation


def _raw_envelope(build_frame=None, frame_type=12, major=1, minor=0, extra_slots=0, identifier=b"SRW1") -> bytes:
    """An envelope written with the raw FlatBuffers builder, independent of `encode`."""
    b = flatbuffers.Builder(256)
    if build_frame is None:
        s = b.CreateString("bye")
        b.StartObject(1)
        b.PrependUOffsetTRelativeSlot(0, s, 0)
        frame = b.EndObject()
    else:
        frame = build_frame(b)
    b.StartObject(7 + extra_slots)
    b.PrependUint16Slot(0, major, 0)
    b.PrependUint16Slot(1, minor, 0)
    if frame_type:
        b.PrependUint8Slot(5, frame_type, 0)
    if frame:
        b.PrependUOffsetTRelativeSlot(6, frame, 0)
    for i in range(extra_slots):
        b.PrependInt64Slot(7 + i, 1234 + i, 0)
    b.Finish(b.EndObject(), file_identifier=identifier)
    return bytes(b.Output())


DEFAULT_LIMITS = Limits()


def _code(buf, limits=DEFAULT_LIMITS) -> ErrorCode:
    with pytest.raises(WireError) as ei:
        decode(buf, limits)
    assert not ei.value.message.startswith("unexpected"), ei.value.message
    return ei.value.code


def test_raw_reference_frame_decodes():
    assert decode(_raw_envelope()).frame == Bye("bye")


def test_identifier():
    assert _code(_raw_envelope(identifier=b"XXXX")) is ErrorCode.BAD_IDENTIFIER
    assert _code(b"") is ErrorCode.BAD_IDENTIFIER
    assert _code(b"\x08\x00\x00\x00SRW") is ErrorCode.BAD_IDENTIFIER


def test_newer_major_version_is_rejected_clearly():
    with pytest.raises(WireError) as ei:
        decode(_raw_envelope(major=2))
    assert ei.value.code is ErrorCode.UNSUPPORTED_VERSION and "2.0" in ei.value.message
    assert _code(_raw_envelope(major=0)) is ErrorCode.UNSUPPORTED_VERSION
    assert _code(encode(Envelope(Bye(), version=ProtocolVersion(3, 1)))) is ErrorCode.UNSUPPORTED_VERSION


def test_newer_minor_with_unknown_fields_still_decodes():
    """Forward compatibility: a 1.2 writer appended an Envelope field and a Bye field."""

    def bye_with_extra(b):
        s = b.CreateString("later")
        b.StartObject(3)
        b.PrependUOffsetTRelativeSlot(0, s, 0)
        b.PrependInt32Slot(2, 99, 0)
        return b.EndObject()

    env = decode(_raw_envelope(bye_with_extra, minor=PROTOCOL_VERSION.minor + 1, extra_slots=2))
    assert env.frame == Bye("later") and env.version == (1, PROTOCOL_VERSION.minor + 1)


def test_union_type():
    assert _code(_raw_envelope(frame_type=0)) is ErrorCode.MALFORMED
    assert _code(_raw_envelope(frame_type=len(FRAME_TYPES) + 1)) is ErrorCode.MALFORMED
    assert _code(_raw_envelope(frame_type=200, minor=PROTOCOL_VERSION.minor + 1)) is ErrorCode.UNSUPPORTED_VERSION
    assert _code(_raw_envelope(build_frame=lambda b: 0)) is ErrorCode.MALFORMED  # type without value


def _features(b, with_tensor=True, dtype=0, codec=0, shape=(2,), payload=b"\0" * 8, orig=0):
    tensor = 0
    if with_tensor:
        b.StartVector(1, len(payload), 16)
        b.head -= len(payload)
        b.Bytes[b.head : b.head + len(payload)] = payload
        pay = b.EndVector()
        shp = b.CreateNumpyVector(np.asarray(shape, np.int64))
        b.StartObject(10)
        b.PrependUint8Slot(0, dtype, 0)
        b.PrependUOffsetTRelativeSlot(1, shp, 0)
        b.PrependUint8Slot(2, codec, 0)
        b.PrependUOffsetTRelativeSlot(3, pay, 0)
        b.PrependUint8Slot(8, orig, 0)
        tensor = b.EndObject()
    b.StartObject(7)
    b.PrependInt64Slot(0, 5, 0)
    if tensor:
        b.PrependUOffsetTRelativeSlot(3, tensor, 0)
    return b.EndObject()


def _feat_env(**kw) -> bytes:
    return _raw_envelope(lambda b: _features(b, **kw), frame_type=3)


def test_required_fields_and_enums():
    assert decode(_feat_env()).frame.tensor.shape == (2,)
    assert _code(_feat_env(with_tensor=False)) is ErrorCode.MALFORMED
    assert _code(_feat_env(dtype=77)) is ErrorCode.MALFORMED
    assert _code(_feat_env(codec=9)) is ErrorCode.MALFORMED
    assert _code(_feat_env(orig=12)) is ErrorCode.MALFORMED

    def weights_bad_kind(b):
        s = b.CreateString("w")
        b.StartObject(8)
        b.PrependUOffsetTRelativeSlot(1, s, 0)
        b.PrependUint8Slot(2, 7, 0)
        return b.EndObject()

    assert _code(_raw_envelope(weights_bad_kind, frame_type=8)) is ErrorCode.MALFORMED

    def error_bad_code(b):
        b.StartObject(3)
        b.PrependUint16Slot(0, 999, 0)
        return b.EndObject()

    assert _code(_raw_envelope(error_bad_code, frame_type=11)) is ErrorCode.MALFORMED


def test_tensor_shape_rules():
    assert _code(_feat_env(shape=(-2,), payload=b"")) is ErrorCode.BAD_TENSOR
    assert _code(_feat_env(shape=(3,))) is ErrorCode.BAD_TENSOR  # 3 x f32 != 8 bytes
    assert _code(_feat_env(shape=(2,), payload=b"\0" * 7)) is ErrorCode.BAD_TENSOR
    assert _code(_feat_env(shape=(1,) * 9 + (2,))) is ErrorCode.LIMIT_EXCEEDED  # rank 10 > 8
    assert decode(_feat_env(shape=(1,) * 7 + (2,))).frame.tensor.shape == (1,) * 7 + (2,)
    # product overflowing int64 must not wrap around to "matches"
    assert _code(_feat_env(shape=(2**62, 2**62, 0, 2))) in (ErrorCode.BAD_TENSOR, ErrorCode.LIMIT_EXCEEDED)
    assert _code(_feat_env(shape=(2**31, 2**31), payload=b"")) is ErrorCode.LIMIT_EXCEEDED
    assert _code(_feat_env(codec=int(Codec.INT8_TENSOR), dtype=int(DType.I8))) is ErrorCode.BAD_TENSOR


def test_limits():
    env = sample_envelopes()[0]
    buf = encode(env)
    assert _code(buf, Limits(max_frame_bytes=len(buf) - 1)) is ErrorCode.LIMIT_EXCEEDED
    assert decode(buf, Limits(max_frame_bytes=len(buf))).frame == env.frame
    assert _code(buf, Limits(max_string_bytes=10)) is ErrorCode.LIMIT_EXCEEDED
    ctx = encode(sample_envelopes()[4])
    assert _code(ctx, Limits(max_list_len=2)) is ErrorCode.LIMIT_EXCEEDED
    big = encode(Envelope(Features(step=0, epoch=0, point=0, tensor=tensor_frame_from_array(np.zeros(1000, np.float32)))))
    assert _code(big, Limits(max_elements=999)) is ErrorCode.LIMIT_EXCEEDED
    assert Limits().max_frame_bytes == 64 * 2**20 and Limits().max_rank == 8


def test_bad_utf8_and_out_of_bounds_offsets():
    buf = bytearray(encode(Envelope(Bye("hello"))))
    i = buf.index(b"hello")
    buf[i] = 0xFF
    assert _code(bytes(buf)) is ErrorCode.MALFORMED
    buf = bytearray(encode(Envelope(Bye("hello"))))
    struct.pack_into("<I", buf, i - 4, 10**6)  # string length past the end
    assert _code(bytes(buf)) is ErrorCode.MALFORMED
    buf = bytearray(encode(Envelope(Bye("hello"))))
    struct.pack_into("<I", buf, 0, len(buf) + 100)  # root offset past the end
    assert _code(bytes(buf)) is ErrorCode.MALFORMED


def test_decode_rejects_non_buffers():
    for bad in (None, 12, "text", [1, 2]):
        assert _code(bad) is ErrorCode.MALFORMED


def test_wire_error_carries_code_and_message():
    e = WireError(ErrorCode.PROTOCOL, "features before hello")
    assert e.code is ErrorCode.PROTOCOL and e.message == "features before hello"
    assert "PROTOCOL" in str(e)
    assert WireError(4242, "x").code is ErrorCode.UNKNOWN
