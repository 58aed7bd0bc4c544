"""Tensor codecs: round trips, error bounds, top-k selection, NaN/Inf policy, sizes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from schemas import codecs
from schemas.codecs import (
    Codec,
    DType,
    NonFiniteError,
    check_tensor_frame,
    decode_tensor,
    encode_tensor,
    encoded_nbytes,
    tensor_frame_from_array,
    tensor_frame_from_tensor,
    tensor_to_numpy,
)
from schemas.errors import ErrorCode, WireError

LOSSY = [c for c in Codec if c is not Codec.NONE]
SHAPES = [(), (1,), (7,), (0,), (3, 0, 2), (2, 3), (4, 5, 3, 2), (2, 1, 9)]


def _rand(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3 + 0.5


# ----------------------------------------------------------------------------- parse / labels


@pytest.mark.parametrize(
    "name,codec",
    [
        ("fp32", Codec.NONE),
        ("none", Codec.NONE),
        ("fp16", Codec.FP16),
        ("bf16", Codec.BF16),
        ("int8", Codec.INT8_TENSOR),
        ("int8c", Codec.INT8_CHANNEL),
        ("int4", Codec.INT4),
        ("topk", Codec.TOPK),
        ("INT8C", Codec.INT8_CHANNEL),
        ("int8_channel", Codec.INT8_CHANNEL),
    ],
)
def test_parse(name, codec):
    assert Codec.parse(name) is codec
    assert Codec.parse(codec.label) is codec
    assert Codec.parse(int(codec)) is codec


def test_parse_rejects_unknown_and_lists_choices():
    with pytest.raises(ValueError) as ei:
        Codec.parse("int3")
    for label in ("fp32", "fp16", "bf16", "int8", "int8c", "int4", "topk"):
        assert repr(label) in str(ei.value)
    with pytest.raises(ValueError):
        Codec.parse(99)


def test_labels_are_unique_short_names():
    assert [c.label for c in Codec] == ["fp32", "fp16", "bf16", "int8", "int8c", "int4", "topk"]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("shape", SHAPES)
def test_error_term_is_decode_minus_input(codec, shape):
    x = _rand(shape, seed=len(shape))
    tf, err = encode_tensor(x, codec)
    out = decode_tensor(tf)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert err.shape == x.shape and err.dtype == torch.float32
    torch.testing.assert_close(out - x, err, atol=1e-6, rtol=0)
    assert tf.nbytes == encoded_nbytes(shape, codec)
    check_tensor_frame(tf)


@pytest.mark.parametrize("codec", list(Codec))
def test_non_contiguous_input(codec):
    base = _rand((6, 8, 5), seed=3)
    x = base.transpose(0, 2)[:, ::2]  # (5, 4, 6), strided
    assert not x.is_contiguous()
    tf, err = encode_tensor(x, codec)
    out = decode_tensor(tf)
    torch.testing.assert_close(out - x, err, atol=1e-6, rtol=0)
    ref, _ = encode_tensor(x.contiguous(), codec)
    np.testing.assert_array_equal(tf.payload, ref.payload)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    ],
)
def test_lossless_all_dtypes(dtype):
    x = torch.arange(-12, 12).reshape(2, 3, 4) * 7
    x = x.to(dtype) if dtype is not torch.uint8 else x.abs().to(dtype)
    tf, err = encode_tensor(x, Codec.NONE)
    assert tf.dtype is DType.from_torch(dtype)
    out = decode_tensor(tf)
    assert out.dtype == dtype and torch.equal(out, x)
    assert torch.count_nonzero(err) == 0


def test_int64_labels_roundtrip_via_numpy():
    y = np.array([0, 9, 2**40, -5], dtype=np.int64)
    tf = tensor_frame_from_array(y)
    assert tf.dtype is DType.I64 and tf.codec is Codec.NONE
    np.testing.assert_array_equal(tensor_to_numpy(tf), y)
    assert torch.equal(decode_tensor(tf), torch.from_numpy(y))


def test_lossless_frame_shares_memory_with_contiguous_source():
    x = torch.arange(10, dtype=torch.float32)
    tf = tensor_frame_from_tensor(x)
    assert np.shares_memory(tf.payload, x.numpy())


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_lossy_codecs_return_original_float_dtype(codec, dtype):
    x = _rand((3, 4, 5)).to(dtype)
    tf, err = encode_tensor(x, codec)
    assert tf.orig_dtype is DType.from_torch(dtype)
    out = decode_tensor(tf)
    assert out.dtype == dtype and err.dtype == torch.float32


@pytest.mark.parametrize("codec", LOSSY)
def test_lossy_codecs_reject_integer_input(codec):
    with pytest.raises(ValueError, match="floating-point"):
        encode_tensor(torch.arange(6), codec)


def test_fp16_and_bf16_relative_error():
    x = _rand((64, 64))
    for codec, tol in ((Codec.FP16, 2.0**-11), (Codec.BF16, 2.0**-8)):
        _, err = encode_tensor(x, codec)
        rel = (err.abs() / x.abs().clamp_min(1e-30)).max().item()
        assert rel <= tol * 1.0001, (codec, rel)


def test_fp16_saturates_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6, 3.0])
    out = decode_tensor(encode_tensor(x, Codec.FP16)[0])
    assert out.tolist() == [65504.0, -65504.0, 3.0]


# ----------------------------------------------------------------------------- error bounds


def _per_channel(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


@pytest.mark.parametrize("codec", [Codec.INT8_TENSOR, Codec.INT8_CHANNEL, Codec.INT4])
@pytest.mark.parametrize("axis", [1, 0, 2, -1])
def test_affine_error_within_half_scale(codec, axis):
    # channels with very different ranges, one all-positive, one all-negative, one constant
    x = _rand((6, 5, 7), seed=11)
    x[:, 0] *= 100
    x[:, 1] = x[:, 1].abs() + 10
    x[:, 2] = -x[:, 2].abs() - 3
    x[:, 3] = 4.25
    tf, err = encode_tensor(x, codec, axis=axis)
    scales = torch.from_numpy(tf.scales.copy())
    if codec is Codec.INT8_TENSOR:
        assert tf.scales.size == 1 and tf.axis == -1
        bound = scales[0] / 2
        assert err.abs().max() <= bound * (1 + 1e-5)
    else:
        ax = axis % 3
        assert tf.axis == ax and tf.scales.size == x.shape[ax]
        per = _per_channel(err.abs(), ax).amax(dim=1)
        assert torch.all(per <= scales / 2 * (1 + 1e-5) + 1e-12), (per, scales / 2)
        # per-channel scales really differ (the 100x channel must not set everyone's scale)
        if ax == 1:
            assert scales[0] > 20 * scales[4]
    qmin, qmax = (-128, 127) if codec is not Codec.INT4 else (0, 15)
    assert tf.zero_points.min() >= qmin and tf.zero_points.max() <= qmax


@pytest.mark.parametrize("codec", [Codec.INT8_TENSOR, Codec.INT8_CHANNEL, Codec.INT4])
def test_affine_range_uses_all_codes_and_zero_is_exact(codec):
    x = torch.linspace(-2.0, 6.0, 4096).reshape(1, 1, -1)
    x[0, 0, 1] = 0.0
    tf, err = encode_tensor(x, codec)
    assert err[0, 0, 1].item() == 0.0
    if codec is Codec.INT4:
        codes = np.concatenate([tf.payload & 15, tf.payload >> 4])
        assert codes.min() == 0 and codes.max() == 15
    else:
        assert tf.payload.min() == -128 and tf.payload.max() == 127
    expect = 8.0 / (15 if codec is Codec.INT4 else 255)
    assert tf.scales[0] == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("codec", [Codec.INT8_TENSOR, Codec.INT8_CHANNEL, Codec.INT4])
@pytest.mark.parametrize("value", [0.0, 5.0, -3.5, 1e-20])
def test_constant_tensors(codec, value):
    x = torch.full((3, 4, 5), value)
    tf, err = encode_tensor(x, codec)
    assert np.all(tf.scales > 0) and np.all(np.isfinite(tf.scales))
    assert err.abs().max().item() <= abs(value) * 1e-6 + 1e-30
    torch.testing.assert_close(decode_tensor(tf), x, atol=abs(value) * 1e-6, rtol=0)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    x = torch.tensor([[[0.0, 15.0, 1.0, 2.0, 3.0]]])  # one channel, 5 codes -> 3 bytes, range [0, 15], scale 1
    tf, err = encode_tensor(x, Codec.INT4)
    assert tf.scales[0] == 1.0 and tf.zero_points[0] == 0
    assert tf.payload.tolist() == [0 | 15 << 4, 1 | 2 << 4, 3]
    assert err.abs().max().item() == 0.0


def test_stochastic_rounding_bounded_and_unbiased():
    x = torch.full((200_000,), 0.3) + torch.linspace(0, 1e-3, 200_000)
    x = torch.cat([x, torch.tensor([-1.0, 1.0])]).reshape(1, 1, -1)
    g = torch.Generator().manual_seed(0)
    tf, err = encode_tensor(x, Codec.INT8_TENSOR, stochastic=True, generator=g)
    scale = float(tf.scales[0])
    assert err.abs().max().item() <= scale * (1 + 1e-5)
    assert abs(err.mean().item()) < scale * 0.01  # deterministic rounding: |bias| ~ 0.2*scale
    _, err_det = encode_tensor(x, Codec.INT8_TENSOR)
    assert abs(err_det[0, 0, :-2].mean().item()) > scale * 0.05
    g2 = torch.Generator().manual_seed(0)
    tf2, _ = encode_tensor(x, Codec.INT8_TENSOR, stochastic=True, generator=g2)
    np.testing.assert_array_equal(tf.payload, tf2.payload)


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_exactly_the_k_largest_magnitudes(ratio):
    n = 1000
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    x = ((torch.arange(n, dtype=torch.float32) + 1) * torch.where(perm % 2 == 0, 1.0, -1.0))[perm]
    x = x.reshape(10, 100)
    tf, _err = encode_tensor(x, Codec.TOPK, topk_ratio=ratio)
    k = max(1, round(ratio * n))
    assert tf.k == k and tf.payload.size == k and tf.indices.size == k
    kept = set(tf.indices.tolist())
    expect = set(torch.topk(x.abs().reshape(-1), k).indices.tolist())
    assert kept == expect
    out = decode_tensor(tf)
    flat = x.reshape(-1)
    assert torch.equal(out.reshape(-1)[list(kept)], flat[list(kept)])
    mask = torch.ones(n, dtype=torch.bool)
    mask[list(kept)] = False
    assert torch.count_nonzero(out.reshape(-1)[mask]) == 0
    # the smallest kept magnitude is >= the largest dropped one
    if mask.any():
        assert flat[~mask].abs().min() >= flat[mask].abs().max()
    assert tf.nbytes == encoded_nbytes(x.shape, Codec.TOPK, topk_ratio=ratio) == 8 * k


def test_topk_rejects_bad_ratio():
    with pytest.raises(ValueError):
        encode_tensor(torch.ones(4), Codec.TOPK, topk_ratio=0.0)


# ----------------------------------------------------------------------------- NaN / Inf policy


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_lossy_codecs_reject_non_finite(codec, bad):
    x = _rand((2, 3, 4))
    x[1, 2, 3] = bad
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        encode_tensor(x, codec)


def test_lossless_codec_carries_non_finite():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    out = decode_tensor(encode_tensor(x, Codec.NONE)[0])
    assert torch.isnan(out[0]) and out[1] == float("inf") and out[2] == -float("inf")


# ----------------------------------------------------------------------------- sizes & checks


@pytest.mark.parametrize("codec", list(Codec))
def test_encoded_nbytes_matches_feature_map(codec):
    shape = (32, 64, 32, 16)
    n = 32 * 64 * 32 * 16
    expect = {
        Codec.NONE: 4 * n,
        Codec.FP16: 2 * n,
        Codec.BF16: 2 * n,
        Codec.INT8_TENSOR: n + 8,
        Codec.INT8_CHANNEL: n + 8 * 64,
        Codec.INT4: n // 2 + 8 * 64,
        Codec.TOPK: 8 * round(0.1 * n),
    }[codec]
    assert encoded_nbytes(shape, codec) == expect
    assert encoded_nbytes(shape, codec.label) == expect


def test_check_tensor_frame_rejects_inconsistent_frames():
    tf, _ = encode_tensor(_rand((4, 3, 2)), Codec.INT8_CHANNEL)
    cases = {
        "short payload": dict(payload=tf.payload[:-1]),
        "negative dim": dict(shape=(-4, 3, 2)),
        "scales count": dict(scales=tf.scales[:2]),
        "zero scale": dict(scales=np.zeros(3, np.float32)),
        "nan scale": dict(scales=np.full(3, np.nan, np.float32)),
        "zero point": dict(zero_points=np.full(3, 300, np.int32)),
        "axis": dict(axis=5),
        "dtype": dict(dtype=DType.U8, payload=tf.payload.view(np.uint8)),
    }
    for what, change in cases.items():
        bad = tensor_frame_from_array(np.zeros(1))  # placeholder, replaced below
        bad.__dict__.update({**tf.__dict__, **change})
        with pytest.raises(WireError) as ei:
            check_tensor_frame(bad)
        assert ei.value.code is ErrorCode.BAD_TENSOR, what


def test_half_codecs_match_torch_rounding_bit_for_bit():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(9)) * torch.logspace(-30, 30, 50_000)
    x = torch.cat([x, torch.tensor([3.3895313892515355e38, -3.4e38, 1e-45, 0.0, -0.0, 65519.0, 70000.0])])
    bf = decode_tensor(encode_tensor(x, Codec.BF16)[0])
    ref = x.clamp(-3.3895313892515355e38, 3.3895313892515355e38).bfloat16().float()
    assert torch.equal(bf.view(torch.int32), ref.view(torch.int32))
    h = decode_tensor(encode_tensor(x, Codec.FP16)[0])
    assert torch.equal(h, x.clamp(-65504, 65504).half().float())
    assert torch.isfinite(h).all() and torch.isfinite(bf).all()


def test_fp16_rounds_exactly_as_ieee_half_including_ties_subnormals_and_the_edge():
    """fp16 goes through torch for speed; its payload must be the IEEE round-to-
    nearest-even half numpy computes (the reference), values past 65504 clamped."""
    edge = [65504.0, 65519.0, 65520.0, 1e9, -1e9, 0.0, -0.0, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 1e-8, 2.0**-14]
    ties = [1 + k * 2.0**-11 for k in range(1, 64, 2)]  # exactly halfway between two halves
    rng = np.random.default_rng(0)
    x = np.concatenate([np.array(edge + ties, np.float32), rng.standard_normal(40_000).astype(np.float32) * 100])
    tf, err = codecs.encode_tensor(torch.from_numpy(x), codecs.Codec.FP16)
    reference = np.clip(x, -65504, 65504).astype(np.float16)
    assert np.array_equal(tf.payload.view(np.uint16), reference.view(np.uint16))  # bit for bit, -0.0 included
    # decoded from a read-only buffer, as a received frame's payload is
    received = dataclasses.replace(tf, payload=np.frombuffer(tf.payload.tobytes(), np.float16))
    assert not received.payload.flags.writeable
    back = codecs.decode_tensor(received)
    assert torch.equal(back, torch.from_numpy(reference.astype(np.float32)))
    assert torch.equal(err, back - torch.from_numpy(x))
