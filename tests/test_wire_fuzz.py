"""Hostile input: whatever the bytes, `decode` raises WireError or returns usable frames.

Four property tests (random bytes, truncations, bit flips, lying tensor
metadata) run > 10,000 cases together; derandomized so CI is reproducible.
A frame that *does* decode must be safe to use: its tensors decode without
error, because validation promised metadata and payload agree.
"""

from __future__ import annotations

import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codecs import Codec, TensorFrame, decode_tensor, encode_tensor
from schemas.errors import WireError
from schemas.frames import Envelope, Features, decode, encode
from schemas.samples import sample_envelopes


def _seeds() -> list[bytes]:
    out = [encode(e) for e in sample_envelopes(shape=(2, 3, 2))]
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    big = torch.randn(300)  # 1200-byte payload: the encoder's append path
    out.append(encode(Envelope(Features(step=2, epoch=0, point=1, tensor=encode_tensor(big, "fp32")[0]))))
    for codec in Codec:
        out.append(encode(Envelope(Features(step=1, epoch=0, point=1, tensor=encode_tensor(x, codec)[0]))))
    return out


SEEDS = _seeds()
LIAR_SHAPE = (3, 5, 7)
LIARS = {}
for _codec in (Codec.NONE, Codec.INT8_CHANNEL, Codec.INT4, Codec.TOPK, Codec.FP16):
    _buf = encode(Envelope(Features(step=1, epoch=0, point=1, tensor=encode_tensor(torch.randn(LIAR_SHAPE), _codec)[0])))
    LIARS[_codec] = (_buf, _buf.index(struct.pack("<3q", *LIAR_SHAPE)))


def _settings(n: int):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


def check(buf) -> None:
    try:
        env = decode(buf)
    except WireError as e:
        assert not e.message.startswith("unexpected"), f"validation gap: {e.message}"
        return
    for v in vars(env.frame).values():
        if isinstance(v, TensorFrame):
            t = decode_tensor(v)
            assert tuple(t.shape) == tuple(v.shape)


@_settings(2500)
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes(data, with_identifier):
    if with_identifier and len(data) >= 8:
        data = data[:4] + b"SRW1" + data[8:]
    check(data)


@_settings(2500)
@given(st.sampled_from(SEEDS), st.data())
def test_truncated_frames(seed, data):
    cut = data.draw(st.integers(0, len(seed) - 1))
    check(seed[:cut])
    check(memoryview(seed)[len(seed) - cut :])


@_settings(3500)
@given(st.sampled_from(SEEDS), st.data())
def test_bit_flipped_frames(seed, data):
    buf = bytearray(seed)
    for bit in data.draw(st.lists(st.integers(0, 8 * len(buf) - 1), min_size=1, max_size=6)):
        buf[bit // 8] ^= 1 << (bit % 8)
    check(bytes(buf))


_dims = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 40), st.sampled_from([0, 1, 2**31, 2**32 + 1]))


@_settings(2000)
@given(st.sampled_from(sorted(LIARS)), st.lists(_dims, min_size=3, max_size=3), st.integers(-4, 4))
def test_lying_shapes_and_lengths(codec, dims, length_delta):
    buf, at = LIARS[codec]
    buf = bytearray(buf)
    struct.pack_into("<3q", buf, at, *dims)
    if length_delta:  # the shape vector's own length prefix lies too
        struct.pack_into("<I", buf, at - 4, max(0, 3 + length_delta))
    if list(dims) == list(LIAR_SHAPE) and not length_delta:
        assert decode(bytes(buf)).frame.tensor.shape == LIAR_SHAPE
    check(bytes(buf))


def test_lying_shape_is_rejected_not_misread():
    buf, at = LIARS[Codec.NONE]
    buf = bytearray(buf)
    struct.pack_into("<3q", buf, at, 3, 5, 8)
    try:
        decode(bytes(buf))
    except WireError as e:
        assert "payload" in e.message
    else:
        raise AssertionError("3x5x8 float32 accepted over a 3x5x7 payload")


PROPERTY_TESTS = (test_random_bytes, test_truncated_frames, test_bit_flipped_frames, test_lying_shapes_and_lengths)


def test_the_property_tests_together_run_at_least_10000_cases():
    """The budget is configuration: it holds however the tests are selected or ordered.
    (How long they take is a figure for bench/wire.py, not an assertion here.)"""
    counts = [t._hypothesis_internal_use_settings.max_examples for t in PROPERTY_TESTS]
    assert sum(counts) >= 10_000, counts
