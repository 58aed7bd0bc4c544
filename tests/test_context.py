"""Context estimators against synthetic links with known settings (issue 5 §1).

The synthetic link is the shaping proxy's model: FIFO serialization at ``bw``,
then a pipelined one-way latency. Receiver timestamps are in a clock offset by
seconds from the sender's and are read late by a random (exponential) amount,
sometimes by a lot (a busy event loop).
"""

from __future__ import annotations

import math
import random

import pytest

from edge_sdk.context import (
    NS,
    BandwidthEstimator,
    ComputeEstimator,
    ContextSnapshot,
    ContextTracker,
    RttEstimator,
)
from edge_sdk.decision.cost_model import Choice, LinkEstimate, apply_context
from tests.decision_inputs import make

MBIT = 1e6
FEATURE = 32 * 1024  # int8 features of a 32 x 16 x 8 x 8 cut
GRADIENT = 64 * 1024  # the same cut's fp16 gradient
CONTROL = 300  # a Context / ping frame


def link(frames, bw_bps, one_way_s, offset_ns, rng, read_jitter_s=0.0005, busy_per_s=0.5):
    """Send ``frames`` = [(sender time s, nbytes)] (sorted) through a FIFO link.

    The receiver reads in order, each frame a random while (exponential, mean
    ``read_jitter_s``) after it arrived; ``busy_per_s`` times a second it is busy
    for 5-50 ms and frames that arrive meanwhile wait for that read (then come
    in one batch). Returns [(sent_ns sender clock, recv_ns receiver clock, nbytes)].
    """
    out, busy_until, last_read, last_t = [], 0.0, 0.0, frames[0][0]
    for t, n in frames:
        start = max(t, busy_until)
        busy_until = start + n * 8 / bw_bps
        late = rng.expovariate(1 / read_jitter_s)
        if rng.random() < 1 - math.exp(-busy_per_s * max(t - last_t, 0.002)):
            late += rng.uniform(0.005, 0.05)
        last_t = t
        last_read = max(busy_until + one_way_s + late, last_read + 1e-5)
        out.append((round(t * NS), round(last_read * NS) + offset_ns, n))
    return out


def idle_traffic(steps, big, step_s, rng, control_every=1):
    """One big frame per step on an otherwise idle link, and small control frames."""
    frames = []
    for i in range(steps):
        t = 10.0 + i * step_s
        frames.append((t, big))
        if i % control_every == 0:
            frames.append((t + rng.uniform(0.3, 0.6) * step_s, CONTROL))
    return sorted(frames)


def saturated_traffic(steps, big, bw_bps, rng, control_every=1):
    """Frames offered faster than the link drains them (K steps in flight, link-bound)."""
    tx = big * 8 / bw_bps
    frames = []
    for i in range(steps):
        t = 10.0 + i * 0.8 * tx
        frames.append((t, big))
        if i % control_every == 0:
            frames.append((t + 0.1 * tx, CONTROL))
    return sorted(frames)


def feed(est, obs):
    for s, r, n in obs:
        est.observe(s, r, n)
    return est


SETTINGS = [(bw, rtt) for bw in (2, 10, 50) for rtt in (0.010, 0.100)]


@pytest.mark.parametrize("bw_mbit,rtt_s", SETTINGS)
def test_uplink_idle_link_fit_within_20pct_after_20_steps(bw_mbit, rtt_s):
    rng = random.Random(int(bw_mbit * 1000 + rtt_s * 1e3))
    bw = bw_mbit * MBIT
    step_s = 2 * (FEATURE * 8 / bw) + rtt_s + 0.02  # K = 0: the link idles between steps
    offset = rng.randint(-5 * NS, 5 * NS)
    obs = link(idle_traffic(20, FEATURE, step_s, rng), bw, rtt_s / 2, offset, rng)
    est = feed(BandwidthEstimator(), obs)
    assert est.method == "fit"
    assert est.bps == pytest.approx(bw, rel=0.20)
    assert est.train_bps() is None


@pytest.mark.parametrize("bw_mbit,rtt_s", SETTINGS)
def test_downlink_with_sparse_control_frames(bw_mbit, rtt_s):
    """Gradients every step, a Context frame only every 5 steps: still enough."""
    rng = random.Random(7 + bw_mbit)
    bw = bw_mbit * MBIT
    step_s = 2 * (GRADIENT * 8 / bw) + rtt_s + 0.02
    obs = link(idle_traffic(20, GRADIENT, step_s, rng, control_every=5), bw, rtt_s / 2, rng.randint(-5 * NS, 5 * NS), rng)
    est = feed(BandwidthEstimator(), obs)
    assert est.bps == pytest.approx(bw, rel=0.20)


@pytest.mark.parametrize("bw_mbit,rtt_s", SETTINGS)
def test_saturated_link_uses_packet_train(bw_mbit, rtt_s):
    rng = random.Random(11 + bw_mbit)
    bw = bw_mbit * MBIT
    obs = link(saturated_traffic(20, FEATURE, bw, rng), bw, rtt_s / 2, rng.randint(-5 * NS, 5 * NS), rng)
    est = feed(BandwidthEstimator(), obs)
    assert est.method == "train"
    assert est.bps == pytest.approx(bw, rel=0.20)
    # the fit alone would be fooled by frames that always queued: the train is what saves us
    assert est.train_bps() == pytest.approx(bw, rel=0.10)


def test_same_size_frames_on_idle_link_are_unknown_not_garbage():
    rng = random.Random(3)
    bw = 10 * MBIT
    frames = [(10.0 + i * 0.2, FEATURE) for i in range(40)]
    est = feed(BandwidthEstimator(), link(frames, bw, 0.02, 3 * NS, rng))
    assert est.bps is None and est.method is None and est.count == 40
    # the same sizes, saturated: the train still measures it
    frames = [(10.0 + i * 0.8 * FEATURE * 8 / bw, FEATURE) for i in range(20)]
    est = feed(BandwidthEstimator(), link(frames, bw, 0.02, 3 * NS, rng))
    assert est.bps == pytest.approx(bw, rel=0.2)


def test_offset_does_not_matter():
    """The same traffic under offsets of -1 day, 0 and +1 day gives the same estimate."""
    bw = 10 * MBIT
    results = []
    for offset in (-86_400 * NS, 0, 86_400 * NS):
        rng = random.Random(5)
        obs = link(idle_traffic(20, FEATURE, 0.2, rng), bw, 0.03, offset, rng)
        results.append(feed(BandwidthEstimator(), obs).bps)
    assert results[0] == pytest.approx(results[1], rel=1e-9) == pytest.approx(results[2], rel=1e-9)


def test_symmetric_timestamp_noise():
    """Gaussian noise (both signs) on both clocks instead of late reads only."""
    rng = random.Random(9)
    bw = 10 * MBIT
    obs = link(idle_traffic(20, FEATURE, 0.1, rng), bw, 0.02, 2 * NS, rng, read_jitter_s=1e-9, busy_per_s=0)
    noisy = [(s + round(rng.gauss(0, 2e-4) * NS), r + round(rng.gauss(0, 2e-4) * NS), n) for s, r, n in obs]
    assert feed(BandwidthEstimator(), noisy).bps == pytest.approx(bw, rel=0.2)


def test_bandwidth_drop_is_tracked_within_a_few_frames():
    """wifi -> iot while link-bound: the train follows within ~10 frames."""
    rng = random.Random(13)
    est = BandwidthEstimator()
    obs = link(saturated_traffic(30, FEATURE, 50 * MBIT, rng), 50 * MBIT, 0.005, 0, rng)
    feed(est, obs)
    assert est.bps == pytest.approx(50 * MBIT, rel=0.2)
    later = [
        (s + 60 * NS, r + 60 * NS, n) for s, r, n in link(saturated_traffic(12, FEATURE, 2 * MBIT, rng), 2 * MBIT, 0.005, 0, rng)
    ]
    feed(est, later)
    assert est.bps == pytest.approx(2 * MBIT, rel=0.2)


def test_intercepts_give_rtt_without_pings():
    rng = random.Random(17)
    offset = rng.randint(-5 * NS, 5 * NS)
    tr = ContextTracker()
    for s, r, n in link(idle_traffic(20, FEATURE, 0.1, rng), 10 * MBIT, 0.030, offset, rng):
        tr.observe_uplink(s, r, n)
    for s, r, n in link(idle_traffic(20, GRADIENT, 0.1, rng), 20 * MBIT, 0.030, -offset, rng):
        tr.observe_downlink(s, r, n)
    snap = tr.snapshot()
    assert snap.rtt_s == pytest.approx(0.060, rel=0.2)
    assert snap.uplink_bps == pytest.approx(10 * MBIT, rel=0.2)
    assert snap.downlink_bps == pytest.approx(20 * MBIT, rel=0.2)
    assert snap.methods == {"uplink": "fit", "downlink": "fit"}


# --------------------------------------------------------------------------- RTT


@pytest.mark.parametrize("rtt_s", [0.010, 0.040, 0.100])
def test_rtt_min_filter_ignores_queueing_and_outliers(rtt_s):
    rng = random.Random(int(rtt_s * 1e4))
    est = RttEstimator()
    t = 5 * NS
    for _ in range(20):
        extra = rng.expovariate(1 / 0.002)
        if rng.random() < 0.2:
            extra += rng.uniform(0.05, 0.5)  # queued behind a big frame
        est.observe(t, t + round((rtt_s + extra) * NS))
        t += NS // 10
    assert est.rtt_s == pytest.approx(rtt_s, rel=0.2)
    assert est.srtt_s >= est.rtt_s
    assert est.srtt_s <= 4 * est.rtt_s + 1e-12  # outliers clipped


def test_rtt_hold_time_and_window():
    est = RttEstimator(window=4)
    assert est.rtt_s is None
    est.observe(0, 30_000_000, remote_hold_ns=10_000_000)
    assert est.rtt_s == pytest.approx(0.020)
    est.observe(100, 50)  # impossible sample: ignored
    assert est.count == 1
    for i in range(4):  # the path got longer: the old minimum ages out
        est.observe(i, i + 80_000_000)
    assert est.rtt_s == pytest.approx(0.080)


# --------------------------------------------------------------------------- compute


def test_compute_estimator_rejects_outliers():
    rng = random.Random(1)
    est = ComputeEstimator()
    est.observe(250.0)  # warm-up step
    for _ in range(40):
        ms = 12.0 * rng.uniform(0.9, 1.1)
        if rng.random() < 0.1:
            ms *= 10  # GC pause
        est.observe(ms)
    assert est.value_ms == pytest.approx(12.0, rel=0.05)
    assert est.rejected >= 2


def test_compute_estimator_follows_a_level_shift():
    est = ComputeEstimator()
    for _ in range(10):
        est.observe(10.0)
    assert not est.observe(40.0) and est.value_ms == pytest.approx(10.0)  # one slow step: ignored
    est.observe(10.0)
    for _ in range(3):  # the cloud got loaded: three in a row
        est.observe(40.0)
    assert est.value_ms == pytest.approx(40.0)
    assert est.observe(41.0)
    assert ComputeEstimator().value_ms is None
    assert not ComputeEstimator().observe(float("nan"))


# --------------------------------------------------------------------------- tracker


def test_tracker_snapshot_prefers_local_and_falls_back_to_remote():
    tr = ContextTracker()
    snap = tr.snapshot()
    assert snap == ContextSnapshot(samples=snap.samples, methods={"uplink": None, "downlink": None})
    tr.observe_remote(uplink_bps=8e6, downlink_bps=0, rtt_s=0.05, cloud_step_ms=3.0, cloud_block_ms=[1.0, 2.0], queue_depth=2)
    for _ in range(5):
        tr.observe_edge_step(20.0, cpu_ms=1.5)
        tr.observe_edge_block(0, 5.0)
    snap = tr.snapshot()
    assert snap.uplink_bps == 8e6 and snap.methods["uplink"] == "remote"
    assert snap.downlink_bps is None  # 0 means "not known" on the wire
    assert snap.rtt_s == 0.05 and snap.cloud_step_ms == 3.0 and snap.queue_depth == 2
    assert snap.cloud_block_ms == {0: 1.0, 1: 2.0}
    assert snap.edge_step_ms == 20.0 and snap.edge_block_ms == {0: 5.0}
    assert snap.edge_cpu_ms == pytest.approx(1.5)  # the CPU inside the step: compute apart from waiting
    tr.observe_rtt(0, 30_000_000)
    tr.observe_cloud_step(4.0)
    tr.observe_cloud_block(1, 2.5)
    snap = tr.snapshot()
    assert snap.rtt_s == pytest.approx(0.030) and snap.cloud_step_ms == 4.0 and snap.cloud_block_ms == {1: 2.5}
    assert snap.samples["rtt"] == 1 and snap.samples["edge_step"] == 5
    assert snap.to_dict()["cloud_block_ms"] == {"1": 2.5}


def test_snapshot_feeds_the_cost_model():
    """The tracker's snapshot recalibrates decision inputs (the wiring the pipeline does)."""
    tr = ContextTracker()
    rng = random.Random(21)
    for s, r, n in link(idle_traffic(20, FEATURE, 0.4, rng), 2 * MBIT, 0.05, NS, rng):
        tr.observe_uplink(s, r, n)
    for s, r, n in link(idle_traffic(20, GRADIENT, 0.4, rng), 4 * MBIT, 0.05, -NS, rng):
        tr.observe_downlink(s, r, n)
    tr.observe_rtt(0, 100_000_000)
    inputs = apply_context(make(100), tr.snapshot(), Choice(1, "fp16", 2))
    assert inputs.link.uplink_bps == pytest.approx(2 * MBIT, rel=0.2)
    assert inputs.link.downlink_bps == pytest.approx(4 * MBIT, rel=0.2)
    assert inputs.link.rtt_s == pytest.approx(0.1)
    assert isinstance(inputs.link, LinkEstimate)


def test_link_change_detector_flags_a_sudden_slowdown_only():
    from edge_sdk.context import LinkChangeDetector

    det = LinkChangeDetector(warmup=5)
    steady = [0.05, 0.06, 0.055, 0.07, 0.05, 0.065, 0.12, 0.06]  # jitter, one 2x outlier
    assert not any(det.observe(t) for t in steady)
    assert det.observe(1.5)  # 25x the median and > 0.2 s later: the link changed
    assert not any(det.observe(t) for t in (1.4, 1.6, 1.5, 1.45, 1.55, 1.5))  # the new normal
    fast = LinkChangeDetector(warmup=5)
    for t in (0.001, 0.001, 0.001, 0.001, 0.001):
        fast.observe(t)
    assert not fast.observe(0.01)  # 10x, but only 9 ms: scheduling noise, not a link change
