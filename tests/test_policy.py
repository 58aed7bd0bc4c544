"""Decision policies on hand-built contexts (issue 5 §2)."""

from __future__ import annotations

import json
import random

import pytest

from edge_sdk.decision.cost_model import Choice, DecisionInputs, predict
from edge_sdk.decision.policy import CostModelPolicy, Decision, FixedPolicy, Policy
from tests.decision_inputs import L, make


def decide(inputs: DecisionInputs, policy: Policy | None = None, current: Choice | None = None) -> Decision:
    return (policy or CostModelPolicy()).decide(inputs, current, inputs.remaining_steps)


def test_initial_decision_explains_itself():
    d = decide(make(20, slowdown=2))
    assert d.switch and d.choice == Choice(3, "fp16", 2)
    assert d.prediction.choice == d.choice
    assert d.prediction.step_time_s == pytest.approx(0.0483, rel=0.01)
    assert d.prediction.stages.bottleneck_name == "edge"
    assert "initial choice p=3 fp16 K=2" in d.reason and "bound by edge" in d.reason and "runner-up p=" in d.reason
    json.dumps(d.to_dict())  # partition_history material


def test_slow_link_moves_cut_to_smaller_features():
    pol = CostModelPolicy(allowed_points=range(1, L))  # keep device-only out of it
    feats = {bw: decide(make(bw), pol).prediction.feature_bytes for bw in (100, 10, 2)}
    assert feats[100] >= feats[10] >= feats[2]
    assert feats[2] < feats[100] / 4
    assert decide(make(100), pol).choice.point == 1
    assert decide(make(2), pol).choice.point == 4


def test_slow_uplink_picks_stronger_codec():
    pol = CostModelPolicy(allowed_points=[1])
    fast = decide(make(100), pol).choice
    slow = decide(make(5, down_mbps=100), pol).choice
    assert fast.codec in ("fp32", "fp16")
    assert slow.codec == "int4"


def test_very_slow_link_goes_device_only():
    d = decide(make(0.5))
    assert d.choice.point == L and d.prediction.device_only and "device-only" in d.reason


def test_fast_link_slow_device_moves_cut_shallower():
    base = decide(make(20, slowdown=2)).choice
    fast_link_slow_dev = decide(make(1000, slowdown=20)).choice
    assert base.point == 3
    assert fast_link_slow_dev.point == 1
    # the device alone, link fixed: slower device -> shallower cut
    assert decide(make(20, slowdown=8)).choice.point < base.point


def test_long_rtt_raises_staleness_and_hides_latency():
    short = decide(make(50, rtt_ms=5))
    long_ = decide(make(50, rtt_ms=200))
    assert short.choice.staleness == 2
    assert long_.choice.staleness == 7
    assert (short.choice.point, short.choice.codec) == (long_.choice.point, long_.choice.codec)
    # replay hides 195 ms of extra RTT almost completely
    assert long_.prediction.step_time_s < 1.02 * short.prediction.step_time_s
    seq = predict(Choice(long_.choice.point, long_.choice.codec, 0), make(50, rtt_ms=200))
    assert seq.step_time_s > 5 * long_.prediction.step_time_s


def test_memory_budget_caps_staleness():
    inp = make(50, rtt_ms=200)
    free = decide(inp).choice
    assert free.staleness == 7
    budget = predict(Choice(free.point, free.codec, 3), inp).memory_bytes
    pinned = CostModelPolicy(allowed_points=[free.point], allowed_codecs=[free.codec], memory_budget_bytes=budget)
    d = decide(inp, pinned)
    assert d.choice == Choice(free.point, free.codec, 3)
    assert "K capped at 3 by the memory budget" in d.reason
    # free to move, the engine finds something else that fits (a deeper cut, smaller E per step)
    d = decide(inp, CostModelPolicy(memory_budget_bytes=budget))
    assert d.prediction.memory_bytes <= budget
    with pytest.raises(ValueError, match="no feasible"):
        decide(inp, CostModelPolicy(memory_budget_bytes=1000))


def test_raw_upload_only_when_allowed():
    inp = make(1000, slowdown=50)  # raw upload would be 100x faster here
    assert decide(inp).choice.point >= 1
    allowed = decide(inp, CostModelPolicy(allow_raw_upload=True))
    assert allowed.choice.point == 0 and allowed.prediction.stages.t1_edge_s == 0.0
    # and even an explicit allowed_points list does not sneak it in
    assert decide(inp, CostModelPolicy(allowed_points=[0, 1, 2])).choice.point >= 1


def test_min_head_depth_honoured():
    inp = make(1000, slowdown=20)
    assert decide(inp).choice.point == 1
    assert decide(inp, CostModelPolicy(min_head_blocks=2)).choice.point == 2
    for p in (make(0.5), make(100), make(2)):
        assert decide(p, CostModelPolicy(min_head_blocks=3)).choice.point >= 3


def test_allowed_codecs_respected():
    d = decide(make(5, down_mbps=100), CostModelPolicy(allowed_points=[1, 2], allowed_codecs=["fp16", "int8"]))
    assert d.choice.codec == "int8"


def test_no_flapping_under_noisy_context():
    rng = random.Random(0)
    pol = CostModelPolicy()
    cur = decide(make(20, slowdown=2), pol).choice
    switches = 0
    for step in range(60):
        noisy = make(
            20 * rng.uniform(0.93, 1.07),
            rtt_ms=10 * rng.uniform(0.8, 1.2),
            slowdown=2 * rng.uniform(0.95, 1.05),
            remaining=1000 - 10 * step,
        )
        d = pol.decide(noisy, cur, noisy.remaining_steps)
        switches += d.switch
        cur = d.choice
    assert switches == 0


def test_no_flapping_between_near_equal_points():
    """Find the bandwidth where p=1 and p=3 cost the same; wobbling around it never switches."""
    pol = CostModelPolicy(allowed_points=[1, 3], allowed_codecs=["fp16"])
    lo, hi = 5.0, 200.0
    for _ in range(40):  # bisection on the crossover
        mid = (lo * hi) ** 0.5
        if decide(make(mid), pol).choice.point == 3:
            lo = mid
        else:
            hi = mid
    cross = (lo * hi) ** 0.5
    assert decide(make(cross * 0.97), pol).choice.point == 3
    assert decide(make(cross * 1.03), pol).choice.point == 1
    cur = decide(make(cross * 0.97), pol).choice
    reasons = []
    for i in range(20):
        d = pol.decide(make(cross * (1.03 if i % 2 == 0 else 0.97)), cur, 1000)
        assert not d.switch, d.reason
        assert d.choice == cur
        reasons.append(d.reason)
    assert sum(r.startswith("keeping p=3") for r in reasons) == 10  # the 1.03 half: p=1 best but not worth it


def test_switches_when_saving_beats_migration_and_not_near_the_end():
    pol = CostModelPolicy()
    wifi = decide(make(100), pol).choice
    assert wifi.point == 1
    iot = make(0.5)
    d = pol.decide(iot, wifi, 1000)
    assert d.switch and d.choice.point == L
    assert d.saving_s > pol.margin * d.switch_cost_s > 0
    assert "switching p=1" in d.reason
    # three steps before the end, moving ~3 MB of weights down a 0.5 Mbit/s link is not worth it
    late = pol.decide(iot, wifi, 3)
    assert not late.switch and late.choice == wifi
    assert late.switch_cost_s > late.saving_s / pol.margin > 0


def test_raising_K_alone_is_free():
    pol = CostModelPolicy()
    inp = make(50, rtt_ms=200)
    best = decide(inp).choice
    cur = Choice(best.point, best.codec, 0)
    d = pol.decide(inp, cur, 1000)
    assert d.switch and d.choice == best and d.switch_cost_s == 0.0


def test_disallowed_current_is_left():
    pol = CostModelPolicy(min_head_blocks=2)
    d = pol.decide(make(1000, slowdown=20), Choice(1, "fp32", 1), 1000)
    assert d.switch and d.choice.point == 2 and "no longer allowed" in d.reason
    # a current choice that does not exist in these inputs at all
    d = pol.decide(make(1000, slowdown=20), Choice(9, "fp32", 1), 1000)
    assert d.switch and d.choice.point == 2


def test_fixed_policy():
    inp = make(20)
    c = Choice(2, "int8", 3)
    pol = FixedPolicy(c)
    first = pol.decide(inp, None, 500)
    assert first.switch and first.choice == c
    assert first.prediction.total_time_s == pytest.approx(predict(c, inp.with_remaining(500)).total_time_s)
    again = pol.decide(inp, c, 400)
    assert not again.switch and again.prediction.remaining_steps == 400
    assert isinstance(pol, Policy)
