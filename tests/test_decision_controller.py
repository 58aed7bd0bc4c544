"""The decision controller on hand-built snapshots: evidence first, surely faster, dwell (issue 10 §1)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from edge_sdk.context import ContextSnapshot
from edge_sdk.decision.controller import DecisionController
from edge_sdk.decision.cost_model import Choice, DecisionInputs, predict
from edge_sdk.decision.policy import CostModelPolicy
from edge_sdk.decision.uncertainty import SpreadTracker, Uncertainty
from tests.decision_inputs import L, make


def snapshot(
    inputs: DecisionInputs,
    current: Choice,
    *,
    up_mbps: float | None,
    down_mbps: float | None = None,
    noise: float = 0.0,
    rng: random.Random | None = None,
    samples: int = 50,
) -> ContextSnapshot:
    """What the tracker would report while running ``current`` on this link, with
    multiplicative Gaussian noise on every measured input."""
    rng = rng or random.Random(0)

    def jitter() -> float:
        return 1 + rng.gauss(0, noise) if noise else 1.0

    stages = predict(current, inputs).stages
    down = down_mbps if down_mbps is not None else up_mbps
    return ContextSnapshot(
        uplink_bps=up_mbps * 1e6 * jitter() if up_mbps else None,
        downlink_bps=down * 1e6 * jitter() if down else None,
        rtt_s=inputs.link.rtt_s,
        edge_step_ms=stages.t1_edge_s * 1e3 * jitter(),
        cloud_step_ms=stages.t3_cloud_s * 1e3 * jitter() or None,
        samples={"uplink": samples, "downlink": samples, "rtt": 5, "edge_step": samples, "cloud_step": samples},
        methods={"uplink": "train", "downlink": "fit"},
    )


def controller(inputs: DecisionInputs, current: Choice, **kw) -> DecisionController:
    return DecisionController(base_inputs=inputs, policy=CostModelPolicy(), current=current, total_steps=1000, **kw)


def run_noisy(up_mbps: float, *, robust: bool, noise: float = 0.1, seed: int = 0) -> int:
    """Switches over 90 decisions on a steady link whose measurements are noisy."""
    rng = random.Random(seed)
    inputs = make(up_mbps, slowdown=4)
    start = CostModelPolicy().decide(inputs, None, 1000).choice
    fragile = {"min_dwell_steps": 0, "spreads": SpreadTracker(floor=0, cap=0, unknown=0)}
    ctl = controller(inputs, start, **({} if robust else fragile))
    switches = 0
    for i in range(90):
        step = 10 + 10 * i
        d = ctl.decide(step, snapshot(inputs, ctl.current, up_mbps=up_mbps, noise=noise, rng=rng), 0.0)
        if d is not None:
            switches += 1
            ctl.current = d.choice
            ctl.switched(step)
    return switches


@pytest.mark.parametrize("up_mbps", [10.0, 30.0, 35.0])
def test_noisy_but_steady_link_makes_no_switch(up_mbps):
    # without the uncertainty band and the dwell the same measurements flap
    assert run_noisy(up_mbps, robust=False) >= 5
    assert run_noisy(up_mbps, robust=True) == 0


def test_prior_after_reset_yields_no_decision_and_says_why():
    inputs = make(20)
    cur = Choice(2, "fp16", 2)
    ctl = controller(inputs, cur)
    # the estimators were reset: no link estimate, the cost model would use the prior
    snap = snapshot(inputs, cur, up_mbps=None, samples=0)
    assert ctl.decide(10, snap) is None
    entry = ctl.history[-1]
    assert entry["waiting"] and not entry["switch"]
    assert "uplink (prior 20 Mbit/s, 0 samples)" in entry["reason"]
    # a few frames later the estimate exists but rests on too few samples: still waiting,
    # and the waiting stretch stays one history entry
    assert ctl.decide(13, snapshot(inputs, cur, up_mbps=0.25, samples=3)) is None
    assert len(ctl.history) == 1 and ctl.history[-1]["waited_until"] == 13
    assert "uplink (3/6 samples since reset)" in ctl.history[-1]["reason"]
    # with enough samples of a 250 kbit/s link it decides, and leaves the split
    d = ctl.decide(16, snapshot(inputs, cur, up_mbps=0.25))
    assert d is not None and d.choice.point == L


def test_poor_link_yields_device_only_and_a_recovered_link_a_split_again():
    inputs = make(20, slowdown=4)
    cur = Choice(2, "fp16", 2)
    ctl = controller(inputs, cur)
    d = ctl.decide(10, snapshot(inputs, cur, up_mbps=0.25))
    assert d is not None and d.choice == Choice(L, "fp32", 0) and d.prediction.device_only
    reason = ctl.history[-1]["reason"]
    assert "current re-estimated p=2 fp16 K=2" in reason and "bound by uplink" in reason
    assert "device-only" in reason and "measured: uplink train (50)" in reason
    ctl.current = d.choice
    ctl.switched(10)
    # device-only: the link is known from probes only; when it recovers, split again
    # (a link change forces the decision through the dwell); the new link's spread is
    # unknown until three decisions have seen it, so the first ones wait for a clear win
    ctl.force(60)
    decisions = [ctl.decide(step, snapshot(inputs, ctl.current, up_mbps=50)) for step in (63, 66, 69)]
    d = next(d for d in decisions if d is not None)
    assert 0 < d.choice.point < L


def test_without_a_link_estimate_a_split_measured_far_slower_than_training_alone_is_left():
    """After a link change the delay fit may have nothing to work with (one frame
    size, all queued): the link stays unknown, but the split's step interval is
    measured, and training alone needs no link. 2 s/step against ~100 ms alone:
    leave now. Close to the device-only step, or on too few intervals: wait."""
    inputs = make(20, slowdown=4)
    cur = Choice(2, "int8", 2)
    alone_ms = predict(Choice(L, "fp32", 0), inputs).step_time_s * 1e3

    def lost(interval_ms: float, n: int) -> ContextSnapshot:
        snap = snapshot(inputs, cur, up_mbps=None, samples=48)
        return replace(snap, step_interval_ms=interval_ms, samples={**snap.samples, "step_interval": n})

    ctl = controller(inputs, cur)
    ctl.force(100)
    assert ctl.decide(103, lost(2000.0, 3)) is None and ctl.history[-1]["waiting"]  # 3 intervals since the change
    assert ctl.decide(104, lost(1.2 * alone_ms, 6)) is None and ctl.history[-1]["waiting"]  # not clearly faster
    d = ctl.decide(106, lost(2000.0, 6))
    assert d is not None and d.choice == Choice(L, "fp32", 0)
    reason = ctl.history[-1]["reason"]
    assert "measured 2000.0 ms/step over 6 steps" in reason and "uplink (prior 20 Mbit/s, 48 samples)" in reason


def test_dwell_holds_a_new_configuration_unless_the_link_changed():
    inputs = make(20, slowdown=4)
    cur = Choice(2, "fp16", 2)
    ctl = controller(inputs, cur, min_dwell_steps=50)
    ctl.switched(100)
    assert ctl.decide(120, snapshot(inputs, cur, up_mbps=0.25)) is None
    assert ctl.history[-1]["reason"].startswith("dwell: 20 of 50 steps since the last switch")
    ctl.force(120)
    d = ctl.decide(123, snapshot(inputs, cur, up_mbps=0.25))
    assert d is not None and d.choice.point == L


def test_a_saving_inside_the_uncertainty_is_not_taken():
    inputs = make(40, slowdown=4)
    pol = CostModelPolicy()
    cur = Choice(2, "fp32", 2)
    exact = pol.decide(inputs, cur, 1000)
    assert exact.switch  # with exact inputs p=1 int8 looks better ...
    fuzzy = pol.decide(inputs, cur, 1000, Uncertainty(edge=0.2, cloud=0.2, uplink=0.2, downlink=0.2))
    assert not fuzzy.switch and "at worst within edge +-20%" in fuzzy.reason  # ... by 18 %, but not surely


def test_spread_tracker_forgets_a_reset_estimator():
    tr = SpreadTracker(floor=0.01, cap=0.5, unknown=0.3)
    for v in (10e6, 10.5e6, 9.5e6, 10e6):
        tr.observe(ContextSnapshot(uplink_bps=v, samples={"uplink": 40}))
    assert 0.01 < tr.spread("uplink") < 0.2
    tr.observe(ContextSnapshot(uplink_bps=0.25e6, samples={"uplink": 2}))  # reset, a new link
    assert tr.spread("uplink") == 0.3  # too few values of the new link: assumed


def _slow_split(inputs: DecisionInputs, cur: Choice, factor: float) -> ContextSnapshot:
    """The link and compute as modelled, but steps come ``factor`` x slower than predicted."""
    snap = snapshot(inputs, cur, up_mbps=50)
    interval = factor * 1e3 * predict(cur, inputs).step_time_s
    return replace(snap, step_interval_ms=interval, samples={**snap.samples, "step_interval": 30})


def test_a_split_measured_slower_than_its_model_makes_the_device_train_alone_and_stay():
    """1x device on a good link: the model says p=2 fp16 K=3 beats training alone by
    15 %, but its steps come 2x slower than the model explains (the device shares
    its CPU with the link stack). Two decisions in a row that agree price every
    split 2x; then training alone wins, and, alone, the engine does not go back to a
    split on the model's word."""
    inputs = make(50, slowdown=1)
    cur = CostModelPolicy().decide(inputs, None, 1000).choice
    assert cur == Choice(2, "fp16", 3)
    ctl = controller(inputs, cur)
    assert ctl.decide(10, _slow_split(inputs, cur, 2.0)) is None  # one reading is not a pattern
    assert ctl.split_slowdown == 1.0
    d = ctl.decide(20, _slow_split(inputs, cur, 2.0))
    assert d is not None and d.choice.point == L and ctl.split_slowdown == pytest.approx(2.0, rel=0.01)
    assert "device-only" in ctl.history[-1]["reason"]
    ctl.current = d.choice
    ctl.switched(20)
    for step in range(80, 300, 20):  # past the dwell, on the same good link
        alone = snapshot(inputs, ctl.current, up_mbps=50)
        assert ctl.decide(step, alone) is None
    assert ctl.split_slowdown == pytest.approx(2.0, rel=0.01)


def test_a_slow_interval_right_after_a_link_change_is_not_learned():
    inputs = make(50, slowdown=1)
    cur = Choice(2, "fp16", 3)
    ctl = controller(inputs, cur)
    ctl.force(10)  # the link changed: intervals now mix two links
    for step in (13, 16, 19):
        ctl.decide(step, _slow_split(inputs, cur, 3.0))
    assert ctl.split_slowdown == 1.0
    # within the noise band it is no slowdown at all
    ctl = controller(inputs, cur)
    for step in (10, 20, 30):
        assert ctl.decide(step, _slow_split(inputs, cur, 1.1)) is None
    assert ctl.split_slowdown == 1.0


def _busy(inputs: DecisionInputs, cur: Choice, factor: float) -> ContextSnapshot:
    """A good link, but the device's CPU time per step ``factor`` x what the start-up
    timing predicts for ``cur`` (its kernels run that much slower)."""
    snap = snapshot(inputs, cur, up_mbps=50)
    cpu_ms = factor * predict(cur, inputs).stages.t1_edge_s * 1e3
    return replace(snap, edge_step_ms=cpu_ms, edge_cpu_ms=cpu_ms)


def test_a_split_that_slows_the_devices_compute_makes_it_train_alone_and_stay():
    """1x device on a good link, the cloud computing on the same cores (emulation):
    the split's CPU time per step comes 2.5x the start-up timing, which measured the
    device alone. The first reading after the start is the split's own cost, so
    training alone, priced at the start-up timing, wins; alone, the device computes
    at that speed, and the engine does not go back to a split on the model's word."""
    inputs = make(50, slowdown=1)
    cur = CostModelPolicy().decide(inputs, None, 1000).choice
    assert cur.point < L
    ctl = controller(inputs, cur)
    d = ctl.decide(10, _busy(inputs, cur, 2.5))
    assert ctl.split_compute_factor == pytest.approx(2.5)
    assert d is not None and d.choice.point == L
    ctl.current = d.choice
    ctl.switched(10)
    for step in range(70, 300, 20):
        assert ctl.decide(step, _busy(inputs, ctl.current, 1.0)) is None
    assert ctl.split_compute_factor == pytest.approx(2.5)
    # the summary's "alone would cost" is priced the same way
    assert ctl.device_only_estimate(_busy(inputs, ctl.current, 1.0), 100)["step_ms"] == pytest.approx(
        predict(Choice(L, "fp32", 0), inputs).step_time_s * 1e3, rel=0.01
    )


def test_a_device_busy_in_general_goes_back_to_the_split_once_alone_is_as_slow():
    """The same 2.5x reading while splitting, but the device was busy in general:
    alone it computes 2.5x slower too. The reading alone settles the factor at 1,
    and after the dwell the split, faster at equal device speed, comes back."""
    inputs = make(50, slowdown=1)
    cur = CostModelPolicy().decide(inputs, None, 1000).choice
    ctl = controller(inputs, cur)
    d = ctl.decide(10, _busy(inputs, cur, 2.5))
    assert d is not None and d.choice.point == L
    ctl.current = d.choice
    ctl.switched(10)
    decisions = [ctl.decide(step, _busy(inputs, ctl.current, 2.5)) for step in range(20, 200, 20)]
    assert ctl.split_compute_factor == 1.0
    back = [(i, d) for i, d in enumerate(decisions) if d is not None]
    assert back and back[0][1].choice.point < L and 20 + 20 * back[0][0] >= 60  # after the dwell


def _probed(up_mbps: float | None, samples: int = 6) -> ContextSnapshot:
    """What the tracker knows at start-up: the link from a few probes, no step yet."""
    bps = up_mbps * 1e6 if up_mbps else None
    return ContextSnapshot(
        uplink_bps=bps,
        downlink_bps=bps,
        rtt_s=0.01,
        samples={"uplink": samples, "downlink": samples, "rtt": samples},
        methods={"uplink": "fit", "downlink": "fit"},
    )


def test_start_up_probing_stops_once_more_probes_could_not_change_the_choice():
    """A 4x device: below ~4 Mbit/s device-only wins by far, and the choice is
    settled after the minimum probes (one padded probe after the handshake's three). Where the best cut flips with the bandwidth
    (device-only to p=3 at ~5.7 Mbit/s, p=3 to p=2, p=2 to p=1), the choice near
    the flip is not settled: 30 % either way would change it."""
    inputs = make(20, slowdown=4)
    ctl = controller(inputs, Choice(2, "fp16", 2))
    assert not ctl.initial_settled(_probed(None, samples=0))  # no link estimate yet
    assert not ctl.initial_settled(_probed(0.25, samples=3))  # too few samples
    grid = [0.25 * 1.05**i for i in range(120)]  # 0.25 .. ~85 Mbit/s
    policy = CostModelPolicy()
    best = [policy.decide(make(up, slowdown=4), None, 1000).choice for up in grid]
    flips = [i for i in range(1, len(grid)) if best[i].point != best[i - 1].point]
    assert len(flips) == 3 and best[0].point == L and best[flips[0]].point < L
    for i in flips:
        assert not ctl.initial_settled(_probed((grid[i - 1] * grid[i]) ** 0.5)), (grid[i], best[i - 1], best[i])
    alone = [g for g in grid if g < grid[flips[0]] / 1.35]
    assert len(alone) > 50 and all(ctl.initial_settled(_probed(g)) for g in alone)
    # on the least evidence (three small probes, one padded) only a choice that a
    # 4x error in the link would not change is settled
    assert ctl.initial_settled(_probed(0.25, samples=4))
    near = grid[flips[0]] / 2
    assert ctl.initial_settled(_probed(near)) and not ctl.initial_settled(_probed(near, samples=4))
