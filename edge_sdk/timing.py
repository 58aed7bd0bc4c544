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

from edge_sdk.pipeline import EdgePipeline
from edge_sdk.privacy.defences import CutDefence
from edge_sdk.runtime.base import HeadRuntime


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
    return profile_runtimes({"runtime": runtime}, x, grad, repeats)["runtime"]


def profile_runtimes(
    runtimes: dict[str, HeadRuntime], x: torch.Tensor, grad: torch.Tensor, repeats: int = 5
) -> dict[str, dict[str, float]]:
    """:func:`profile_runtime` for several runtimes, their steps taken round-robin.

    Why: a ratio between two runtimes timed one after the other takes in whatever
    the machine did meanwhile (on a shared 2-core VM a neighbour's burst lasts
    seconds); interleaved, each round sees the same conditions for all of them.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    saved = {k: {n: v.detach().clone() for n, v in rt.named_buffers().items()} for k, rt in runtimes.items()}
    for rt in runtimes.values():
        rt.forward(x)
        rt.replay_backward(x, grad)
    samples: dict[str, dict[str, list[float]]] = {k: {"forward_ms": [], "replay_ms": [], "step_ms": []} for k in runtimes}
    for _ in range(repeats):
        for k, rt in runtimes.items():
            t0 = time.perf_counter()
            rt.forward(x)
            t1 = time.perf_counter()
            rt.replay_backward(x, grad)
            t2 = time.perf_counter()
            samples[k]["forward_ms"].append((t1 - t0) * 1e3)
            samples[k]["replay_ms"].append((t2 - t1) * 1e3)
            samples[k]["step_ms"].append((t2 - t0) * 1e3)
    with torch.no_grad():
        for k, rt in runtimes.items():
            for n, v in rt.named_buffers().items():
                v.copy_(saved[k][n])
    return {k: {**{m: statistics.median(v) for m, v in ms.items()}, "repeats": repeats} for k, ms in samples.items()}


def compute_clock():
    """The clock that measures one compute call: this thread's CPU time when torch
    computes on this thread alone, wall time when intra-op threads share the work
    (their CPU time is not this thread's).

    Why CPU time at all: on a busy machine, time the thread spent preempted is not
    the device's compute; CPU time leaves it out."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


class SplitStepTimer:
    """Times one whole split step through ``EdgePipeline`` per call (CPU ms).

    Why not the head's forward + backward alone: the device's step also takes the
    optimizer step, captures the RNG for replay, builds, frames and decodes the
    frames (the features up, the gradients down) and keeps the window; per-block timings miss those, and they do not grow with the cut,
    so a model calibrated on block sums mispredicts every other point. This times
    the very code the device runs (lossless codec: the codec is priced apart).
    CPU time rather than wall time where it is the whole compute (see
    :func:`compute_clock`). The runtime's weights *are* trained: pass one built on a copy.
    """

    def __init__(
        self, runtime: HeadRuntime, x: torch.Tensor, y: torch.Tensor, *, point: int, optimizer, defence: CutDefence | None = None
    ) -> None:
        # the run's defence is part of its step: NoPeek's penalty gradient is device compute
        self.pipe = EdgePipeline(
            runtime,
            point=point,
            optimizer=optimizer,
            codec="fp32",
            grad_codec="fp32",
            staleness=0,
            staleness_guard=False,
            defence=defence,
        )
        self.x, self.y = x, y
        self._grad_frame = None

    def __call__(self) -> float:
        from schemas import codecs
        from schemas import frames as fr

        clock = compute_clock()
        c0 = clock()
        feats = self.pipe.start_step(self.x, self.y, epoch=0)
        fr.encode(fr.Envelope(frame=feats))  # the device frames what it sends ...
        c1 = clock()
        if self._grad_frame is None:
            g = 1e-3 * torch.randn(tuple(feats.tensor.shape), generator=torch.Generator().manual_seed(0))
            self._grad_frame, _ = codecs.encode_tensor(g, codecs.Codec.parse("fp32"))
        reply = fr.encode(fr.Envelope(frame=fr.Gradients(step=feats.step, tensor=self._grad_frame)))
        c2 = clock()
        self.pipe.on_gradients(fr.decode(reply).frame)  # ... and decodes what comes back
        return (c1 - c0 + clock() - c2) * 1e3


class LocalStepTimer:
    """Times one device-only step through ``EdgePipeline.local_step`` per call (CPU ms):
    forward, loss, backward, optimizer step, as training alone runs them. The
    runtime's weights are trained: pass one built on a copy."""

    def __init__(self, runtime: HeadRuntime, x: torch.Tensor, y: torch.Tensor, *, point: int, optimizer, loss_fn) -> None:

        self.pipe = EdgePipeline(
            runtime, point=point, optimizer=optimizer, codec="fp32", num_blocks=point, loss_fn=loss_fn, staleness_guard=False
        )
        self.x, self.y = x, y

    def __call__(self) -> float:
        clock = compute_clock()
        c0 = clock()
        self.pipe.local_step(self.x, self.y, epoch=0)
        return (clock() - c0) * 1e3


class CodecStepTimer:
    """Times the device's codec work of one step at a cut of ``shape`` (CPU ms):
    encode the features with ``codec``, decode the gradient sent with
    ``grad_codec``, apply the error-feedback correction when ``codec`` is lossy.

    Why measured: per byte, int4 and per-channel int8 cost 2-3x what per-tensor
    int8 does (bit packing, per-channel scales), so one cost per byte for every
    codec misprices the codec choice exactly where the cut is big.
    """

    def __init__(self, shape: tuple[int, ...], codec: str, grad_codec: str) -> None:
        from schemas import codecs

        self.x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        self.codec = codecs.Codec.parse(codec)
        self.g_frame, _ = codecs.encode_tensor(1e-3 * self.x, codecs.Codec.parse(grad_codec))

    def __call__(self) -> float:
        from schemas import codecs

        clock = compute_clock()
        t0 = clock()
        _, error = codecs.encode_tensor(self.x, self.codec)
        g = codecs.decode_tensor(self.g_frame)
        if error is not None:
            EdgePipeline.error_feedback_correction(g, error)
        return (clock() - t0) * 1e3


def median_interleaved(timers: dict, repeats: int, warmup: int = 1, budget_s: float | None = None) -> dict:
    """Median of ``repeats`` calls of every timer, taken round-robin.

    Why round-robin: on a shared or throttling machine a slow spell lasts tens of
    milliseconds; timing one configuration after another lets a spell land on a
    single one and bend the comparison between them. Interleaved, a spell costs
    every configuration one sample. Stops early (with at least one sample each)
    when ``budget_s`` of wall time is spent.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1, warmup >= 0")
    for t in timers.values():
        for _ in range(warmup):
            t()
    samples: dict = {k: [] for k in timers}
    start = time.perf_counter()
    for _ in range(repeats):
        for k, t in timers.items():
            samples[k].append(t())
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in samples.items()}


def pipeline_step_ms(
    runtime: HeadRuntime, x: torch.Tensor, y: torch.Tensor, *, point: int, optimizer, repeats: int = 10, warmup: int = 2
) -> float:
    """Median CPU milliseconds of one whole split step (see :class:`SplitStepTimer`)."""
    timer = SplitStepTimer(runtime, x, y, point=point, optimizer=optimizer)
    return median_interleaved({point: timer}, repeats, warmup)[point]
