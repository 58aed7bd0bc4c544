"""Moving the cut on the device side (sans-I/O).

Sequence (the client drives it; docs/design.md §1, point 4):

1. drain: no step in flight (a gradient for the old cut cannot be applied to the
   new head);

Moving the cut to the block count ``L`` is *device-only* training: the cloud hands
every block down and keeps the (empty) session, so the cut can come back later
the same way.
2. :func:`request_frames`: when blocks move *to the cloud* (new point < old), their
   weights, buffers and optimizer state go first as ``Weights`` frames; then the
   ``Repartition`` frame;
3. the cloud answers with ``Weights`` frames (when blocks move *to the device*)
   and a ``RepartitionAck``; none when the device's own copy of those blocks
   has the cloud's state hash (``Repartition.state_hash``: both ends built the
   model from the same seed, and the blocks have not trained since);
4. :func:`complete`: install what arrived and switch the pipeline to the new head
   with the optimizer state carried over.
"""

from __future__ import annotations

from collections.abc import Callable

from edge_sdk.blocks import BlockModel
from edge_sdk.migration import StateAssembler, check_complete, export_state, import_state, state_hash
from edge_sdk.pipeline import EdgePipeline
from edge_sdk.runtime.base import HeadRuntime
from schemas.errors import ErrorCode, WireError
from schemas.frames import Repartition, RepartitionAck, Weights


def request_frames(
    pipeline: EdgePipeline, model: BlockModel, new_point: int, *, codec: str, staleness: int
) -> list[Repartition | Weights]:
    """The frames that ask the cloud to move the cut to ``new_point``."""
    if pipeline.in_flight:
        raise RuntimeError("drain the pipeline before repartitioning")
    # the block count is a cut too: the device takes every block and trains alone
    valid = sorted({p for p in model.cut_points if 0 <= p < model.num_blocks} | {model.num_blocks})
    if new_point not in valid:
        raise ValueError(f"cannot move the cut to {new_point}; valid: {valid}")
    step = pipeline.next_step
    frames: list[Repartition | Weights] = []
    if new_point < pipeline.point:
        frames += export_state(model, range(new_point, pipeline.point), pipeline.optimizer_state_by_name(), step=step)
    # blocks coming down: say what our own copy of them is, so an unchanged one need not travel
    digest = state_hash(model, range(pipeline.point, new_point), {}) if new_point > pipeline.point else ""
    frames.append(Repartition(step=step, point=new_point, codec=codec, staleness=staleness, state_hash=digest))
    return frames


def complete(
    pipeline: EdgePipeline,
    model: BlockModel,
    ack: RepartitionAck,
    received: list[Weights],
    make_runtime: Callable[[int], HeadRuntime],
    *,
    codec: str,
    staleness: int,
) -> None:
    """Install the cloud's blocks (if any) and switch the pipeline to the new cut."""
    if not ack.accepted:
        raise WireError(ErrorCode.PROTOCOL, f"cloud refused to move the cut: {ack.message}")
    new_point = ack.point
    state = pipeline.optimizer_state_by_name()
    if new_point > pipeline.point and ack.state_matched:
        if received:
            raise WireError(ErrorCode.PROTOCOL, "the cloud said our copy of the blocks matched, yet sent weights")
        # our own copy is the cloud's (same hash), with no optimizer state yet
    elif new_point > pipeline.point:
        assembler = StateAssembler()
        for frame in received:
            assembler.add(frame)
        tensors = assembler.tensors()
        check_complete(model, range(pipeline.point, new_point), tensors, new_point)
        state.update(import_state(model, tensors))
    pipeline.switch(make_runtime(new_point), point=new_point, codec=codec, staleness=staleness, optimizer_state=state)
