"""Building the decision engine for a run (which knobs are free, from what profile)."""

from __future__ import annotations

from edge_sdk.decision.controller import DecisionController
from edge_sdk.decision.cost_model import Choice, LinkEstimate, inputs_from_profile
from edge_sdk.decision.policy import CostModelPolicy
from edge_sdk.training import LocalSetup, TrainConfig

#: codecs the engine may pick on its own; top-k is left to explicit requests
#: (its accuracy cost is not in the cost model)
AUTO_CODECS = ("fp32", "fp16", "int8", "int8c", "int4")
INITIAL_CODEC = "int8"
INITIAL_STALENESS = 2
#: a neutral guess until the first measurements (10 Mbit/s, 50 ms)
PRIOR_LINK = LinkEstimate(uplink_bps=10e6, downlink_bps=10e6, rtt_s=0.05)


def initial_choice(cfg: TrainConfig, setup: LocalSetup) -> Choice:
    codec = INITIAL_CODEC if cfg.codec == "auto" else cfg.codec
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

    heads = profile_heads(setup.spec, cfg.runtime, cfg.programs, cfg.batch_size, repeats=3)
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


def build_controller(cfg: TrainConfig, setup: LocalSetup, current: Choice) -> DecisionController | None:
    """A controller when any of point / codec / K is ``auto``; None for a static run.

    The per-block profile is measured here, on this machine, and scaled by the
    device slowdown (in emulation) — the *measured* edge step time then
    recalibrates it (``apply_context``) once training runs.
    """
    if not is_adaptive(cfg):
        return None
    from edge_sdk.profile import profile_model

    spec = setup.spec
    model = spec.model
    profile = profile_model(spec, cfg.batch_size, optimizer=cfg.optimizer, repeats=3, warmup=1)
    interior = [p for p in model.cut_points if 0 < p < model.num_blocks]
    if setup.program_points is not None:  # only points with an exported program
        interior = [p for p in interior if p in setup.program_points]
    inputs = inputs_from_profile(
        profile,
        link=PRIOR_LINK,
        device_slowdown=cfg.device_slowdown,
        label_bytes=cfg.batch_size * 8,
        remaining_steps=setup.total_steps(cfg),
        cut_points=interior,
        grad_codec=cfg.grad_codec,
    )
    if cfg.runtime != "eager":
        inputs = scale_to_runtime(inputs, cfg, setup)
    policy = CostModelPolicy(
        allowed_points=interior if cfg.auto_point else [current.point],
        allowed_codecs=AUTO_CODECS if cfg.codec == "auto" else [cfg.codec],
        max_staleness=cfg.max_staleness,
        fixed_staleness=cfg.staleness,
        memory_budget_bytes=cfg.memory_budget_bytes,
    )
    return DecisionController(base_inputs=inputs, policy=policy, current=current, total_steps=setup.total_steps(cfg),
                              first_after=cfg.decide_after, every=cfg.decide_every)
