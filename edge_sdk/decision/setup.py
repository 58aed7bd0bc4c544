"""Building the decision engine for a run (which knobs are free, from what profile)."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_sdk.decision.controller import DecisionController
from edge_sdk.decision.cost_model import AUTO_CODECS, Choice, LinkEstimate, inputs_from_profile
from edge_sdk.decision.policy import CostModelPolicy
from edge_sdk.training import LocalSetup, TrainConfig, device_only_possible

INITIAL_CODEC = "int8"
INITIAL_STALENESS = 2
#: a neutral guess until the first measurements (10 Mbit/s, 50 ms)
PRIOR_LINK = LinkEstimate(uplink_bps=10e6, downlink_bps=10e6, rtt_s=0.05)


def initial_choice(cfg: TrainConfig, setup: LocalSetup) -> Choice:
    if setup.point == setup.spec.model.num_blocks:
        return Choice(setup.point, "fp32", 0)  # device-only: no codec, nothing in flight
    codec = INITIAL_CODEC if cfg.codec == "auto" else cfg.codec
    if (setup.point, codec) in setup.privacy_exclusions:  # build_local left a codec here allowed
        codec = next(c for c in AUTO_CODECS if (setup.point, c) not in setup.privacy_exclusions)
    staleness = INITIAL_STALENESS if cfg.staleness is None else cfg.staleness
    return Choice(setup.point, codec, staleness)


def is_adaptive(cfg: TrainConfig) -> bool:
    return cfg.auto_point or cfg.codec == "auto" or cfg.staleness is None


def scale_to_runtime(inputs, cfg: TrainConfig, setup: LocalSetup):
    """Make the per-block device costs those of the runtime that runs the head.

    The per-block profile is eager PyTorch; an exported program can be several
    times slower, and not uniformly. The head step of every exported point is
    timed in the real runtime and in eager (``profile_heads``); the device cost of
    the blocks between two consecutive exported points is scaled by the ratio of
    the runtime's to eager's extra time over that segment.
    """
    from dataclasses import replace

    from edge_sdk.profile import profile_heads

    assert cfg.programs is not None  # TrainConfig.validate: program runtimes need --programs
    heads = profile_heads(setup.spec, cfg.runtime, Path(cfg.programs), cfg.batch_size, repeats=3)
    blocks = list(inputs.blocks)
    prev_point, prev_e, prev_r = 0, 0.0, 0.0
    for h in heads:
        de, dr = h["eager_step_ms"] - prev_e, h["runtime_step_ms"] - prev_r
        ratio = dr / de if de > 1e-6 and dr > 0 else h["ratio"]
        for i in range(prev_point, h["point"]):
            b = blocks[i]
            blocks[i] = replace(b, edge_forward_ms=b.edge_forward_ms * ratio, edge_backward_ms=b.edge_backward_ms * ratio)
        prev_point, prev_e, prev_r = h["point"], h["eager_step_ms"], h["runtime_step_ms"]
    return replace(inputs, blocks=tuple(blocks))


#: wall-clock budget for timing whole split steps per point at start-up; points
#: beyond it (deep cuts of a big model) keep the block sum + fixed part
HEAD_STEP_BUDGET_S = 3.0


def with_measured_head_steps(
    inputs,
    cfg: TrainConfig,
    setup: LocalSetup,
    points: list[int],
    codecs: tuple[str, ...] = (),
    budget_s: float = HEAD_STEP_BUDGET_S,
    repeats: int = 15,
):
    """Time the device's whole split step at ``points`` on the runtime that will
    run the head (``inputs.head_step_s``) and its codec work for each of
    ``codecs`` (``inputs.codec_step_s``); the fixed per-step part the block sums
    miss (``edge_step_fixed_s``, for points left unmeasured) is the median of
    (measured - block sum) over the measured points.

    Why: the per-block profile misses the optimizer step and the pipeline's own
    per-step work, which do not grow with the blocks; calibrating a block-sum model
    at one cut then mispredicts every other cut (measured: 20-30 % too fast at deep
    cuts of the digits CNN). Points are taken shallow first while one step of each
    fits half of ``budget_s``; the samples are taken round-robin
    (:func:`~edge_sdk.timing.median_interleaved`).
    """
    import copy
    import statistics
    import time
    from dataclasses import replace

    from edge_sdk.runtime import EagerRuntime, HeadRuntime, load_runtime
    from edge_sdk.timing import CodecStepTimer, LocalStepTimer, SplitStepTimer, median_interleaved

    spec = setup.spec
    model = copy.deepcopy(spec.model)  # the timing trains: never touch the real weights
    x = spec.example_input(cfg.batch_size)
    y = torch.zeros(cfg.batch_size, dtype=torch.int64)
    timers: dict = {}
    start = time.perf_counter()
    for p in sorted(points):
        if timers and time.perf_counter() - start > budget_s / 2:
            break  # the shallowest point is always timed
        runtime: HeadRuntime
        if cfg.runtime == "eager":
            runtime = EagerRuntime(model.head(p), name_map=model.head_name_map(p))
        else:
            assert cfg.programs is not None  # TrainConfig.validate: program runtimes need --programs
            runtime = load_runtime(cfg.runtime, cfg.programs, p, model.state_dict())
        if p == inputs.num_blocks:  # device-only: the whole model and its loss
            timers[p] = LocalStepTimer(runtime, x, y, point=p, optimizer=cfg.optimizer_config(), loss_fn=spec.loss)
        else:
            timers[p] = SplitStepTimer(runtime, x, y, point=p, optimizer=cfg.optimizer_config(), defence=cfg.cut_defence)
        timers[p]()  # warm-up, and tells how long a step at this point takes
        shape = inputs.blocks[p - 1].out_shape if p < inputs.num_blocks else None
        if shape is not None:
            for codec in codecs:
                timers[(p, codec)] = CodecStepTimer(shape, codec, inputs.grad_codec or codec)
    if not timers:  # no split point to time (a device-only or cloud-only run)
        return inputs
    ms = median_interleaved(timers, repeats, warmup=1, budget_s=max(0.0, budget_s - (time.perf_counter() - start)))
    scale = cfg.device_slowdown / 1e3
    measured = {k: v * scale for k, v in ms.items() if isinstance(k, int)}
    codec_s = {k: v * scale for k, v in ms.items() if isinstance(k, tuple)}
    base = replace(inputs, head_step_s={}, edge_step_fixed_s=0.0)
    fixed = statistics.median(max(0.0, s - base.edge_compute_s(p)) for p, s in measured.items())
    return replace(inputs, head_step_s=measured, edge_step_fixed_s=fixed, codec_step_s=codec_s)


def build_controller(cfg: TrainConfig, setup: LocalSetup, current: Choice) -> DecisionController | None:
    """A controller when any of point / codec / K is ``auto``; None for a static run.

    The per-block profile is measured here, on this machine, and scaled by the
    device slowdown (in emulation) — the *measured* edge step time then
    recalibrates it (``apply_context``) once training runs.
    """
    if not is_adaptive(cfg) or (not cfg.auto_point and current.point == setup.spec.model.num_blocks):
        return None  # static, or device-only pinned: codec and K mean nothing there
    from edge_sdk.profile import profile_model

    spec = setup.spec
    model = spec.model
    profile = profile_model(spec, cfg.batch_size, optimizer=cfg.optimizer, repeats=3, warmup=1)
    L = model.num_blocks
    interior = model.interior_points
    if setup.program_points is not None:  # only points with an exported program
        interior = [p for p in interior if p in setup.program_points]
    # device-only (p = L) is a placement like any cut, where the device can run it
    alone = cfg.allow_device_only and device_only_possible(cfg, setup.manifest, L)
    points = interior + ([L] if alone or current.point == L else [])
    inputs = inputs_from_profile(
        profile,
        link=PRIOR_LINK,
        device_slowdown=cfg.device_slowdown,
        label_bytes=cfg.batch_size * 8,
        remaining_steps=setup.total_steps(cfg),
        cut_points=points,
        grad_codec=cfg.grad_codec,
    )
    if cfg.runtime != "eager":
        inputs = scale_to_runtime(inputs, cfg, setup)
    codecs = AUTO_CODECS if cfg.codec == "auto" else (cfg.codec,)
    allowed_points = points if cfg.auto_point else [current.point]
    inputs = with_measured_head_steps(inputs, cfg, setup, allowed_points, codecs)
    policy = CostModelPolicy(
        allowed_points=allowed_points,
        allowed_codecs=list(codecs),
        max_staleness=cfg.max_staleness,
        fixed_staleness=cfg.staleness,
        memory_budget_bytes=cfg.memory_budget_bytes,
        excluded=dict(setup.privacy_exclusions),
    )
    return DecisionController(
        base_inputs=inputs,
        policy=policy,
        current=current,
        total_steps=setup.total_steps(cfg),
        first_after=cfg.decide_after,
        every=cfg.decide_every,
    )
