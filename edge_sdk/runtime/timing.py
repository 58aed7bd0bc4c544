"""Measure what a head runtime costs per training step on this machine.

Why here and not in the profiler: the decision engine must use the profile of the
runtime that actually runs the head (an ExecuTorch program and eager PyTorch can
differ by orders of magnitude), so ``python -m edge_sdk profile --runtime ...`` calls
:func:`profile_runtime` on the very runtime object the pipeline would use.
"""

from __future__ import annotations

import statistics
import time

import torch

from edge_sdk.runtime.base import HeadRuntime


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_runtime(runtime: HeadRuntime, x: torch.Tensor, grad: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Median wall times in milliseconds.

    ``forward_ms``: the step's train-mode forward (features for upload).
    ``step_ms``: the device's whole per-step compute, forward + replayed forward and
    backward (``T1`` of the cost model without the codec).
    ``replay_ms``: the replayed forward + backward alone.
    One warm-up step runs first (program loading, allocator warm-up). BatchNorm
    running statistics and ``.grad`` are left as after a normal step; weights are
    not changed (no optimizer step).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    saved = {k: v.detach().clone() for k, v in runtime.named_buffers().items()}
    runtime.forward(x)
    runtime.replay_backward(x, grad)
    forward_ms = _median_ms(lambda: runtime.forward(x), repeats)
    replay_ms = _median_ms(lambda: runtime.replay_backward(x, grad), repeats)

    def step() -> None:
        runtime.forward(x)
        runtime.replay_backward(x, grad)

    step_ms = _median_ms(step, repeats)
    with torch.no_grad():
        for k, v in runtime.named_buffers().items():
            v.copy_(saved[k])
    return {"forward_ms": forward_ms, "replay_ms": replay_ms, "step_ms": step_ms, "repeats": repeats}
