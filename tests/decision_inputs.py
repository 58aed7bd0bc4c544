"""Hand-built decision inputs shared by the decision-engine tests.

A small CNN at batch 32 whose numbers can be worked out by hand; tests pass the
link (and device speed) they need.
"""

from __future__ import annotations

from edge_sdk.decision.cost_model import BlockCost, DecisionInputs, LinkEstimate

# A small CNN at batch 32: features shrink 2x per block, compute is flat, params grow.
SHAPES = [(32, 16, 16, 16), (32, 32, 8, 8), (32, 64, 4, 4), (32, 128, 2, 2), (32, 10)]
FWD_MS = [2.0, 2.0, 2.0, 2.0, 0.2]  # desktop forward; backward = 2x
PARAMS = [1_800, 18_500, 74_000, 295_000, 5_200]
L = len(SHAPES)


def make(
    up_mbps: float,
    rtt_ms: float = 10,
    slowdown: float = 4,
    down_mbps: float | None = None,
    remaining: int = 1000,
    cloud_speedup: float = 10,
) -> DecisionInputs:
    blocks = []
    for shape, f, p in zip(SHAPES, FWD_MS, PARAMS):
        n = 1
        for s in shape:
            n *= s
        blocks.append(
            BlockCost(
                f * slowdown,
                2 * f * slowdown,
                3 * f / cloud_speedup,
                param_bytes=4 * p,
                optim_bytes=4 * p,
                activation_bytes=8 * n,
                out_shape=shape,
            )
        )
    link = LinkEstimate(up_mbps * 1e6, (down_mbps or up_mbps) * 1e6, rtt_ms / 1e3)
    return DecisionInputs(tuple(blocks), link, input_bytes=32 * 3 * 32 * 32 * 4, label_bytes=32 * 8, remaining_steps=remaining)
