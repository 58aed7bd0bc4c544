"""Start-up timing of whole split steps, and what the decision engine makes of it."""

from __future__ import annotations

import pytest
import torch

from edge_sdk.decision.cost_model import AUTO_CODECS, Choice, stage_times
from edge_sdk.decision.setup import build_controller, with_measured_head_steps
from edge_sdk.timing import median_interleaved
from edge_sdk.training import TrainConfig, build_local


def test_median_interleaved_takes_samples_round_robin():
    calls: list[str] = []

    def timer(name: str, values: list[float]):
        it = iter(values)

        def t() -> float:
            calls.append(name)
            return next(it)

        return t

    out = median_interleaved({"a": timer("a", [99, 1, 2, 3]), "b": timer("b", [99, 10, 30, 20])}, repeats=3, warmup=1)
    assert out == {"a": 2, "b": 20}  # the warm-up sample (99) is not counted
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]


def test_median_interleaved_stops_at_the_budget_with_one_sample_each():
    out = median_interleaved({"a": lambda: 1.0, "b": lambda: 2.0}, repeats=1000, warmup=0, budget_s=0.0)
    assert out == {"a": 1.0, "b": 2.0}


def _digits(slowdown: float = 10.0) -> tuple[TrainConfig, object]:
    cfg = TrainConfig(model="digits_cnn", dataset="digits", epochs=1, batch_size=32, device_slowdown=slowdown)
    return cfg, build_local(cfg)


def test_build_controller_times_every_point_and_codec_without_training_the_model():
    torch.manual_seed(0)
    cfg, setup = _digits()
    before = {k: v.clone() for k, v in setup.spec.model.state_dict().items()}
    controller = build_controller(cfg, setup, Choice(setup.point, "int8", 2))
    inputs = controller.base_inputs
    L = setup.spec.model.num_blocks
    interior = [p for p in setup.spec.model.cut_points if 0 < p < L]
    # every interior cut, and the device training alone (p = L: no codec there)
    assert sorted(inputs.head_step_s) == [*interior, L]
    assert set(inputs.codec_step_s) == {(p, c) for p in interior for c in AUTO_CODECS}
    # training alone does one forward, a split step two (upload, then replay)
    assert inputs.head_step_s[L] < inputs.head_step_s[interior[-1]] * 1.5
    assert inputs.device_slowdown == 10.0
    # the deepest head does about 4x the shallowest one's work (timed round-robin)
    assert inputs.head_step_s[interior[-1]] > inputs.head_step_s[interior[0]]
    # lossy codecs cost more device time than sending fp32 as it is, at the biggest cut
    assert inputs.codec_step_s[(interior[0], "int4")] > inputs.codec_step_s[(interior[0], "fp32")]
    # the timing trained copies: the model's weights and statistics are untouched
    after = setup.spec.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_zero_budget_times_only_the_shallowest_point():
    cfg, setup = _digits()
    controller = build_controller(cfg, setup, Choice(setup.point, "int8", 2))
    base = controller.base_inputs
    out = with_measured_head_steps(base, cfg, setup, [3, 1, 2], ("int8",), budget_s=0.0, repeats=3)
    assert list(out.head_step_s) == [1] and list(out.codec_step_s) == [(1, "int8")]
    # point 2 is priced from its blocks plus the fixed part estimated at point 1
    fixed = out.edge_step_fixed_s
    assert fixed >= 0.0
    blocks = base.blocks[:2]
    expected = sum(2 * b.edge_forward_ms + b.edge_backward_ms for b in blocks) / 1e3 + fixed
    assert out.edge_compute_s(2) == pytest.approx(expected)
    assert stage_times(Choice(2, "fp32", 1), out).t1_edge_s >= expected


def test_cpu_time_only_when_torch_computes_on_one_thread():
    import time

    from edge_sdk.timing import compute_clock

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert compute_clock() is time.thread_time
        torch.set_num_threads(2)  # intra-op workers' CPU time is not this thread's
        assert compute_clock() is time.perf_counter
    finally:
        torch.set_num_threads(before)


def test_a_fixed_point_times_only_that_point():
    cfg = TrainConfig(model="digits_cnn", dataset="digits", epochs=1, batch_size=32, point=2, codec="auto")
    setup = build_local(cfg)
    inputs = build_controller(cfg, setup, Choice(2, "int8", 2)).base_inputs
    assert list(inputs.head_step_s) == [2]
    assert {p for p, _ in inputs.codec_step_s} == {2}
