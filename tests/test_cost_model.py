"""The pure cost model: docs/design.md §1 formula, stage times, memory, migration."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.decision.cost_model import (
    BlockCost,
    Choice,
    DecisionInputs,
    LinkEstimate,
    StageTimes,
    apply_context,
    drain_time,
    inputs_from_profile,
    migration_time,
    min_staleness_to_fill,
    pipeline_time,
    predict,
    stage_times,
    steady_step_time,
)

MB = 1e6


# --------------------------------------------------------------------------- formula


def test_stage_times_bottleneck_and_total():
    st_ = StageTimes(0.001, 0.002, 0.003, 0.004, latency_s=0.010)
    assert st_.bottleneck == pytest.approx(0.004)
    assert st_.total == pytest.approx(0.020)
    assert st_.bottleneck_name == "downlink"
    assert StageTimes(1, 2, 3, 4).total == 10  # latency defaults to 0: the brief's 4-arg form


def test_pipeline_time_worked_example():
    s = StageTimes(1.0, 2.0, 3.0, 4.0)  # T* = 4, T0 = 10
    # K = 1, r = 4: 2 windows, bubble 10 - 2*4 = 2 -> 3*4 + 10 + 1*2
    assert pipeline_time(4, 1, s) == pytest.approx(24.0)
    # K = 2 fills the pipe: 3*4 >= 10 -> (r-1)*T* + T0
    assert pipeline_time(4, 2, s) == pytest.approx(22.0)
    assert pipeline_time(4, 0, s) == pytest.approx(40.0)  # sequential
    assert pipeline_time(1, 5, s) == pytest.approx(10.0)
    assert pipeline_time(0, 3, s) == 0.0
    with pytest.raises(ValueError):
        pipeline_time(-1, 0, s)


def test_min_staleness_to_fill():
    assert min_staleness_to_fill(StageTimes(1, 2, 3, 4)) == 2  # 3*4 >= 10 > 2*4
    assert min_staleness_to_fill(StageTimes(5, 5, 5, 5)) == 3  # exact fill: 4*5 == 20
    assert min_staleness_to_fill(StageTimes(1, 0, 0, 0)) == 0
    assert min_staleness_to_fill(StageTimes(0.01, 0.001, 0.001, 0.001, latency_s=0.2)) == 21
    assert min_staleness_to_fill(StageTimes(0, 0, 0, 0)) == 0
    with pytest.raises(ValueError):
        min_staleness_to_fill(StageTimes(0, 0, 0, 0, latency_s=0.1))


stage = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1.0))


@settings(max_examples=100, deadline=None)
@given(stage, stage, stage, stage, stage, st.integers(1, 300), st.integers(0, 12))
def test_pipeline_time_properties(a, b, c, d, lat, r, K):
    s = StageTimes(a, b, c, d, lat)
    t = pipeline_time(r, K, s)
    lo = (r - 1) * s.bottleneck + s.total  # perfect pipeline
    assert lo - 1e-9 <= t <= r * s.total + 1e-9  # never worse than sequential
    assert pipeline_time(r, K + 1, s) <= t + 1e-9  # more staleness never slower
    if s.bottleneck == 0.0:  # pure latency: no finite K fills the pipe
        return
    kf = min_staleness_to_fill(s)
    assert pipeline_time(r, kf, s) == pytest.approx(lo)
    if kf > 0 and r > kf and s.total - kf * s.bottleneck > 1e-9 * s.total:  # (not a tie lost in float rounding)
        assert pipeline_time(r, kf - 1, s) > lo  # and K below it is slower
    # steady state is the per-step slope for whole windows
    if r % (K + 1) == 0:
        assert pipeline_time(2 * r, K, s) - t == pytest.approx(r * steady_step_time(K, s), abs=1e-9)


# --------------------------------------------------------------------------- predict


def two_block_inputs(**kw) -> DecisionInputs:
    """A tiny hand-checkable model: 2 blocks, batch of 1000 bytes."""
    blocks = (
        BlockCost(
            edge_forward_ms=10,
            edge_backward_ms=20,
            cloud_ms=3,
            param_bytes=4000,
            optim_bytes=8000,
            activation_bytes=50_000,
            out_bytes={"fp32": 40_000, "fp16": 20_000, "int8": 10_008},
        ),
        BlockCost(
            edge_forward_ms=5,
            edge_backward_ms=10,
            cloud_ms=2,
            param_bytes=1000,
            optim_bytes=2000,
            activation_bytes=1000,
            out_bytes={"fp32": 400},
        ),
    )
    base = dict(
        blocks=blocks,
        link=LinkEstimate(8e6, 16e6, 0.050),
        input_bytes=1000,
        label_bytes=100,
        remaining_steps=100,
        grad_codec="fp16",
        codec_s_per_byte=1e-8,
        frame_overhead_bytes=0,
    )
    base.update(kw)
    return DecisionInputs(**base)


def test_predict_hand_computed():
    inp = two_block_inputs()
    pred = predict(Choice(1, "int8", 0), inp)
    s = pred.stages
    # T1: forward twice (upload + replay) + backward + codec (40 kB encode + 40 kB decode at 10 ns/B)
    assert s.t1_edge_s == pytest.approx(0.010 * 2 + 0.020 + 80_000 * 1e-8)
    assert s.t2_up_s == pytest.approx((10_008 + 100) * 8 / 8e6)  # features + labels
    assert s.t3_cloud_s == pytest.approx(0.002)
    assert s.t4_down_s == pytest.approx(20_000 * 8 / 16e6)  # fp16 gradient
    assert s.latency_s == pytest.approx(0.050)
    assert pred.step_time_s == pytest.approx(s.total)  # K = 0: every step pays T0
    assert pred.total_time_s == pytest.approx(100 * s.total)
    assert pred.feature_bytes == 10_008 and pred.gradient_bytes == 20_000
    # memory: 1 window slot (batch + labels + fp32 error) + acts + params + optim of block 0
    assert pred.memory_bytes == (1000 + 100 + 40_000) + 50_000 + 4000 + 8000
    d = pred.to_dict()
    assert d["point"] == 1 and d["codec"] == "int8" and d["bottleneck"] == "edge"


def test_predict_staleness_hides_latency():
    inp = two_block_inputs()
    k0 = predict(Choice(1, "int8", 0), inp)
    kf = min_staleness_to_fill(k0.stages)
    assert kf >= 2  # 50 ms RTT vs a ~41 ms edge stage
    full = predict(Choice(1, "int8", kf), inp)
    assert full.total_time_s == pytest.approx(99 * k0.stages.bottleneck + k0.stages.total)
    assert full.memory_bytes - k0.memory_bytes == kf * (1000 + 100 + 40_000)


def test_grad_codec_same_as_features_and_fp32_codec_costs_nothing():
    inp = two_block_inputs(grad_codec=None)
    pred = predict(Choice(1, "fp32", 0), inp)
    assert pred.gradient_bytes == 40_000
    assert pred.stages.t1_edge_s == pytest.approx(0.040)  # no codec work for fp32 both ways
    assert pred.memory["error_feedback"] == 0


def test_device_only_and_raw_upload():
    inp = two_block_inputs()
    dev = predict(Choice(2, "int8", 3), inp)
    assert dev.device_only and dev.choice == Choice(2, "fp32", 0)
    assert dev.total_time_s == pytest.approx(100 * (0.030 + 0.015))
    assert dev.stages.t2_up_s == 0 and dev.stages.latency_s == 0
    raw = predict(Choice(0, "fp32", 0), inp)
    assert raw.stages.t1_edge_s == 0.0
    assert raw.stages.t2_up_s == pytest.approx((1000 + 100) * 8 / 8e6)
    assert raw.stages.t3_cloud_s == pytest.approx(0.005)
    assert raw.gradient_bytes == 0


def test_codec_sizes_from_shape_when_table_misses():
    b = BlockCost(1, 1, 1, out_shape=(32, 16, 8, 8))
    n = 32 * 16 * 8 * 8
    assert b.nbytes("fp32") == 4 * n
    assert b.nbytes("fp16") == 2 * n
    assert n <= b.nbytes("int8") <= n + 64
    assert n // 2 <= b.nbytes("int4") <= n // 2 + 8 * 16  # per-channel scales
    assert b.nbytes("topk") < b.nbytes("int8")
    assert BlockCost(1, 1, 1).nbytes("fp16") is None
    assert BlockCost(1, 1, 1, out_shape=(4, 3)).nbytes("int8c") == 12 + 8 * 3  # one fp32 scale + zero point per channel
    with pytest.raises(ValueError):
        BlockCost(1, 1, 1, out_shape=(4,)).nbytes("zip")


def test_migration_time_direction_and_bytes():
    inp = two_block_inputs()
    # deeper: block 1 comes down (params + optimizer state) over the downlink
    assert migration_time(inp, 1, 2) == pytest.approx(3000 * 8 / 16e6 + 0.050)
    # shallower: blocks 0 and 1 go up over the uplink
    assert migration_time(inp, 2, 0) == pytest.approx(15_000 * 8 / 8e6 + 0.050)
    assert migration_time(inp, 1, 1) == 0.0


def test_drain_time():
    inp = two_block_inputs()
    k0 = predict(Choice(1, "int8", 0), inp)
    assert drain_time(k0) == 0.0
    k1 = predict(Choice(1, "int8", 1), inp)
    st_ = k1.stages
    assert drain_time(k1) == pytest.approx(min(st_.total - st_.bottleneck, st_.bottleneck))


def test_from_dict_roundtrip_and_aliases():
    inp = DecisionInputs.from_dict(
        {
            "blocks": [
                {"forward_ms": 1.0, "backward_ms": 2.0, "cloud_ms": 0.5, "cut_bytes": {"fp32": 400}, "param_bytes": 10},
                {"edge_forward_ms": 1.0, "edge_backward_ms": 2.0, "cloud_ms": 0.5, "cut_shape": [2, 5]},
            ],
            "link": {"uplink_mbps": 10, "downlink_mbps": 20, "rtt_ms": 30},
            "input_bytes": 64,
            "cut_points": [0, 1, 2],
            "ignored_key": 1,
        }
    )
    assert inp.link == LinkEstimate(10e6, 20e6, 0.030)
    assert inp.blocks[0].edge_forward_ms == 1.0 and inp.blocks[0].out_bytes == {"fp32": 400}
    assert inp.blocks[1].out_shape == (2, 5) and inp.blocks[1].nbytes("fp32") == 40
    assert inp.points == (0, 1, 2)
    assert inp.codecs_at(1) == ("fp32",)


def test_apply_context_calibrates_link_and_compute():
    inp = two_block_inputs()
    cur = Choice(1, "int8", 0)
    t1 = predict(cur, inp).stages.t1_edge_s

    class Snap:
        uplink_bps = 2e6
        downlink_bps = None  # unknown: keep the configured one
        rtt_s = 0.1
        edge_step_ms = t1 * 1e3 * 2  # device runs twice as slow as profiled
        cloud_step_ms = 4.0  # tail (block 1) measured at 4 ms, profiled 2
        cloud_block_ms = None

    out = apply_context(inp, Snap(), cur)
    assert out.link == LinkEstimate(2e6, 16e6, 0.1)
    assert predict(cur, out).stages.t1_edge_s == pytest.approx(2 * t1)
    # slower than profiled: a fixed per-step device cost, not slower blocks
    assert out.edge_step_overhead_s == pytest.approx(t1)
    assert out.blocks[0].edge_forward_ms == pytest.approx(10)
    assert out.blocks[1].cloud_ms == pytest.approx(4.0)

    Snap.edge_step_ms = t1 * 1e3 / 2  # faster than profiled: the blocks scale down
    out = apply_context(inp, Snap(), cur)
    assert predict(cur, out).stages.t1_edge_s == pytest.approx(t1 / 2)
    assert out.blocks[0].edge_forward_ms == pytest.approx(5) and out.edge_step_overhead_s == 0
    Snap.edge_step_ms = t1 * 1e3 * 2

    Snap.cloud_block_ms = {0: 7.0}
    out = apply_context(inp, Snap(), None)  # no current: link + reported blocks only
    assert out.blocks[0].cloud_ms == 7.0 and out.blocks[1].cloud_ms == 2
    assert out.blocks[0].edge_forward_ms == 10


def test_inputs_from_profile_scales_device_and_cloud():
    # the shape of edge_sdk.profile.ModelProfile.to_dict()
    profile = {
        "blocks": [
            {
                "forward_ms": 1.0,
                "backward_ms": 2.0,
                "param_bytes": 100,
                "buffer_bytes": 8,
                "optimizer_state_bytes": 200,
                "activation_bytes": 300,
                "output_shape": [8, 4],
                "output_bytes": {"fp32": 128, "int8": 40},
            },
            {
                "forward_ms": 0.5,
                "backward_ms": 0.5,
                "param_bytes": 10,
                "buffer_bytes": 0,
                "optimizer_state_bytes": 20,
                "activation_bytes": 30,
                "output_shape": [8, 2],
                "output_bytes": {"fp32": 64},
            },
        ],
        "input_bytes": {"fp32": 256, "int8": 72},
        "cut_points": [0, 1, 2],
    }
    inp = inputs_from_profile(
        profile, link=LinkEstimate(1e6, 1e6, 0.01), device_slowdown=10, cloud_speedup=4, label_bytes=64, remaining_steps=50
    )
    b0 = inp.blocks[0]
    assert (b0.edge_forward_ms, b0.edge_backward_ms, b0.cloud_ms) == (10.0, 20.0, 0.75)
    assert (b0.param_bytes, b0.optim_bytes, b0.activation_bytes) == (108, 200, 300)
    assert b0.nbytes("int8") == 40 and b0.nbytes("fp16") == 64  # table, then shape
    assert inp.input_bytes == 256 and inp.label_bytes == 64 and inp.remaining_steps == 50
    assert inp.points == (0, 1, 2)
    assert inp.codec_s_per_byte == pytest.approx(1e-8)
    assert math.isfinite(predict(Choice(1, "int8", 1), inp).total_time_s)


def test_inputs_from_real_profile():
    """End to end with the real profiler on the smallest zoo model."""
    from edge_sdk import zoo
    from edge_sdk.decision.policy import CostModelPolicy
    from edge_sdk.profile import profile_model

    spec = zoo.build("digits_cnn")
    prof = profile_model(spec, 16, repeats=1, warmup=0)
    inp = inputs_from_profile(
        prof, link=LinkEstimate(10e6, 10e6, 0.02), device_slowdown=8, cloud_speedup=4, label_bytes=16 * 8, remaining_steps=500
    )
    assert inp.points == tuple(prof.cut_points) and inp.num_blocks == len(prof.blocks)
    assert inp.blocks[0].out_bytes == prof.blocks[0].output_bytes
    d = CostModelPolicy().decide(inp, None, 500)
    assert d.switch and 1 <= d.choice.point <= inp.num_blocks
    assert d.prediction.step_time_s > 0 and d.reason


def three_block_inputs(**kw) -> DecisionInputs:
    """Three blocks so two interior points (1 and 2) can be compared."""
    blocks = (
        BlockCost(edge_forward_ms=10, edge_backward_ms=20, cloud_ms=3, out_bytes={"fp32": 40_000, "int8": 10_008}),
        BlockCost(edge_forward_ms=5, edge_backward_ms=10, cloud_ms=2, out_bytes={"fp32": 4_000, "int8": 1_008}),
        BlockCost(edge_forward_ms=1, edge_backward_ms=2, cloud_ms=1, out_bytes={"fp32": 40}),
    )
    base = dict(
        blocks=blocks,
        link=LinkEstimate(8e6, 16e6, 0.050),
        input_bytes=1000,
        remaining_steps=100,
        grad_codec="fp32",
        codec_s_per_byte=1e-8,
        frame_overhead_bytes=0,
    )
    base.update(kw)
    return DecisionInputs(**base)


def test_measured_head_step_and_codec_replace_the_block_sums():
    inp = three_block_inputs(head_step_s={1: 0.100}, codec_step_s={(1, "int8"): 0.007}, edge_step_fixed_s=0.004)
    # measured point: the measurement, not 2 x 10 + 20 ms; the codec as timed, not 10 ns/B
    assert stage_times(Choice(1, "fp32", 0), inp).t1_edge_s == pytest.approx(0.100)
    assert stage_times(Choice(1, "int8", 0), inp).t1_edge_s == pytest.approx(0.107)
    # unmeasured point: the block sum plus the fixed per-step part the blocks miss
    assert stage_times(Choice(2, "int8", 0), inp).t1_edge_s == pytest.approx(2 * 0.015 + 0.030 + 0.004 + 4_000 * 1e-8)
    # the fixed part is compute that exists only with a split step
    assert inp.edge_compute_s(0) == 0.0


class _CpuSnap:
    uplink_bps = downlink_bps = rtt_s = None
    cloud_step_ms = None
    cloud_block_ms = None

    def __init__(self, edge_step_ms: float, edge_cpu_ms: float | None) -> None:
        self.edge_step_ms, self.edge_cpu_ms = edge_step_ms, edge_cpu_ms


def test_apply_context_with_cpu_time_scales_compute_and_keeps_waiting_fixed():
    # emulated device 10x this machine; point 1 measured at 60 ms, point 2 at 90 ms
    inp = three_block_inputs(head_step_s={1: 0.060, 2: 0.090}, device_slowdown=10.0)
    cur = Choice(1, "fp32", 1)
    # in the run the step's CPU time was 9 ms (-> 90 ms of device compute, 1.5x the
    # profile: a busy device) and the step took 100 ms (10 ms of hand-offs)
    out = apply_context(inp, _CpuSnap(edge_step_ms=100.0, edge_cpu_ms=9.0), cur)
    assert stage_times(cur, out).t1_edge_s == pytest.approx(0.100)
    assert out.edge_step_overhead_s == pytest.approx(0.010)
    # the deeper cut: its compute 1.5x slower too, the hand-off cost unchanged
    assert stage_times(Choice(2, "fp32", 1), out).t1_edge_s == pytest.approx(1.5 * 0.090 + 0.010)
    # the block sums (unmeasured points, device-only) scale with the compute
    assert out.blocks[0].edge_forward_ms == pytest.approx(15.0)
    # calibration is absolute, not cumulative: applying it twice changes nothing
    again = apply_context(out, _CpuSnap(edge_step_ms=100.0, edge_cpu_ms=9.0), cur)
    assert stage_times(Choice(2, "fp32", 1), again).t1_edge_s == pytest.approx(1.5 * 0.090 + 0.010)


def test_apply_context_without_cpu_time_keeps_the_additive_calibration():
    inp = three_block_inputs(head_step_s={1: 0.060, 2: 0.090}, device_slowdown=10.0)
    cur = Choice(1, "fp32", 1)
    out = apply_context(inp, _CpuSnap(edge_step_ms=100.0, edge_cpu_ms=None), cur)
    assert out.edge_step_overhead_s == pytest.approx(0.040)
    assert stage_times(Choice(2, "fp32", 1), out).t1_edge_s == pytest.approx(0.130)
