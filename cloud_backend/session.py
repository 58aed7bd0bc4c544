"""One device's training session in the cloud (sans-I/O).

`CloudSession.handle(frame)` takes a decoded frame and returns the frames to send
back; the asyncio server (`cloud_backend.server`) only moves bytes and runs
`handle` off the event loop. Everything here is testable without a socket.

The session runs the tail blocks ``[p, L)``: decode the features, forward, loss,
backward, optimizer step, and reply with the (compressed) gradient of the loss with
respect to the features it received. It is idempotent: a train step id it has
seen is answered from a reply cache and never applied twice.
"""

from __future__ import annotations

import hmac
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

import torch

from edge_sdk import zoo
from edge_sdk.context import ComputeEstimator
from edge_sdk.optim import OptimizerConfig, build_optimizer, set_lr
from schemas import codecs
from schemas.errors import ErrorCode, WireError
from schemas.frames import (
    Bye,
    Context,
    EpochEnd,
    Error,
    EvalResult,
    Features,
    Gradients,
    Hello,
    HelloAck,
    Repartition,
    RepartitionAck,
    Weights,
)
from edge_sdk.migration import (
    StateAssembler,
    export_state,
    import_state,
    install_optimizer_state,
    named_tensors,
    optimizer_state_by_name,
)

#: How many train replies are kept for idempotent re-delivery. A device never has
#: more than K+1 steps in flight, so anything above the largest K is enough.
REPLY_CACHE_SIZE = 256


class Phase(Enum):
    AWAIT_HELLO = "await_hello"
    TRAINING = "training"
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionConfig:
    """Server-wide policy applied to every session."""

    token: str | None = None
    context_every: int = 10  # send a Context frame every N train steps
    max_batch: int = 4096


class CloudSession:
    """The tail of one device's model, its optimizer and step bookkeeping."""

    def __init__(self, session_id: int, config: SessionConfig | None = None) -> None:
        self.session_id = session_id
        self.config = config or SessionConfig()
        self.phase = Phase.AWAIT_HELLO
        self.spec: zoo.ModelSpec | None = None
        self.point = 0
        self.blocks: list[torch.nn.Module] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_config: OptimizerConfig | None = None
        self.replies: OrderedDict[int, Gradients] = OrderedDict()
        self.applied_steps = 0
        self.last_step = -1
        self.step_ms = ComputeEstimator()
        self.block_ms: list[ComputeEstimator] = []
        self.queue_depth = 0  # set by the transport: frames waiting behind this one
        self._eval = {"loss": 0.0, "correct": 0, "count": 0}
        self._incoming: StateAssembler | None = None
        self.partition_history: list[tuple[int, int]] = []  # (step, point)

    # ------------------------------------------------------------------ entry
    def handle(self, frame: object, *, recv_ns: int = 0) -> list[object]:
        """Apply one decoded frame; return the frames to send back, in order.

        Protocol errors become an ``Error`` frame (the session stays usable where
        that is safe); they never raise out of here.
        """
        try:
            return self._dispatch(frame, recv_ns)
        except WireError as exc:
            return [Error(code=exc.code, message=exc.message, step=getattr(frame, "step", -1))]
        except (ValueError, RuntimeError) as exc:  # bad shapes from a peer, model errors
            return [Error(code=ErrorCode.BAD_TENSOR, message=str(exc)[:500], step=getattr(frame, "step", -1))]

    def _dispatch(self, frame: object, recv_ns: int) -> list[object]:
        if self.phase is Phase.CLOSED:
            raise WireError(ErrorCode.PROTOCOL, "session is closed")
        if isinstance(frame, Hello):
            return self._on_hello(frame)
        if self.phase is Phase.AWAIT_HELLO:
            raise WireError(ErrorCode.PROTOCOL, f"expected Hello first, got {type(frame).__name__}")
        if isinstance(frame, Features):
            return self._on_train(frame, recv_ns) if frame.train else self._on_eval(frame)
        if isinstance(frame, EpochEnd):
            return self._on_epoch_end(frame)
        if isinstance(frame, Context):
            return [self.context(frame.step, request_recv_ns=recv_ns)] if frame.request else []
        if isinstance(frame, Weights):
            return self._on_weights(frame)
        if isinstance(frame, Repartition):
            return self._on_repartition(frame)
        if isinstance(frame, Bye):
            self.phase = Phase.CLOSED
            return []
        raise WireError(ErrorCode.PROTOCOL, f"unexpected frame {type(frame).__name__} in phase {self.phase.value}")

    # ------------------------------------------------------------------ hello
    def _on_hello(self, hello: Hello) -> list[object]:
        if self.phase is not Phase.AWAIT_HELLO:
            raise WireError(ErrorCode.PROTOCOL, "Hello sent twice on one session")
        if self.config.token is not None and not hmac.compare_digest(
            hello.token.encode("utf-8"), self.config.token.encode("utf-8")
        ):
            raise WireError(ErrorCode.UNAUTHORIZED, "missing or wrong token")
        try:
            kwargs = json.loads(hello.config_json) if hello.config_json else {}
            if not isinstance(kwargs, dict):
                raise ValueError("config_json must be a JSON object")
            spec = zoo.build(hello.model, seed=hello.seed, **kwargs)
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            raise WireError(ErrorCode.UNKNOWN_MODEL, f"cannot build model {hello.model!r}: {exc}") from None
        if hello.model_hash != spec.config_hash:
            raise WireError(
                ErrorCode.MODEL_MISMATCH,
                f"model {hello.model!r} config hash differs (device {hello.model_hash[:12]}, cloud {spec.config_hash[:12]}): "
                "device and cloud run different model versions",
            )
        if hello.runtime != "eager" and hello.program_hash and hello.program_hash != spec.config_hash:
            raise WireError(
                ErrorCode.MODEL_MISMATCH,
                f"the device's {hello.runtime} programs were exported from another model config "
                f"({hello.program_hash[:12]}, cloud {spec.config_hash[:12]}); export them again",
            )
        if hello.num_blocks != spec.model.num_blocks:
            raise WireError(ErrorCode.MODEL_MISMATCH, f"device says {hello.num_blocks} blocks, cloud has {spec.model.num_blocks}")
        try:
            opt_cfg = OptimizerConfig.from_json(hello.optimizer_json)
        except (ValueError, TypeError) as exc:
            raise WireError(ErrorCode.MALFORMED, f"bad optimizer config: {exc}") from None
        self.spec = spec
        self.optimizer_config = opt_cfg
        self._set_point(hello.point)
        self.phase = Phase.TRAINING
        return [
            HelloAck(
                session=self.session_id,
                accepted=True,
                point=self.point,
                codec=hello.codec,
                staleness=hello.staleness,
                message=f"tail blocks [{self.point}, {spec.model.num_blocks}) of {spec.name}",
            )
        ]

    def _set_point(self, point: int) -> None:
        assert self.spec is not None and self.optimizer_config is not None
        model = self.spec.model
        if point not in model.cut_points or point == model.num_blocks:
            raise WireError(
                ErrorCode.PROTOCOL,
                f"partition point {point} is not a valid cut for the cloud (valid: {[p for p in model.cut_points if p < model.num_blocks]})",
            )
        self.point = point
        self.blocks = list(model.blocks[point:])
        params = [p for b in self.blocks for p in b.parameters()]
        self.optimizer = build_optimizer(params, self.optimizer_config) if params else None
        self.block_ms = [ComputeEstimator() for _ in self.blocks]

    # ------------------------------------------------------------------ train
    def _check_point(self, frame: Features) -> None:
        if frame.point != self.point:
            raise WireError(ErrorCode.PROTOCOL, f"features cut at point {frame.point}, session is at point {self.point}")

    def _inputs(self, frame: Features) -> tuple[torch.Tensor, torch.Tensor]:
        feats = codecs.decode_tensor(frame.tensor)
        if frame.labels is None:
            raise WireError(ErrorCode.MALFORMED, f"step {frame.step}: features without labels")
        labels = codecs.decode_tensor(frame.labels)
        if feats.dim() == 0 or feats.shape[0] != labels.shape[0]:
            raise WireError(ErrorCode.BAD_TENSOR, f"step {frame.step}: batch of {tuple(feats.shape)} features vs {tuple(labels.shape)} labels")
        if feats.shape[0] > self.config.max_batch:
            raise WireError(ErrorCode.LIMIT_EXCEEDED, f"batch {feats.shape[0]} > limit {self.config.max_batch}")
        return feats, labels

    def _forward(self, x: torch.Tensor, *, timed: bool) -> torch.Tensor:
        for block, ewma in zip(self.blocks, self.block_ms):
            if timed:
                t0 = time.perf_counter()
                x = block(x)
                ewma.observe((time.perf_counter() - t0) * 1e3)
            else:
                x = block(x)
        return x

    def _on_train(self, frame: Features, recv_ns: int) -> list[object]:
        cached = self.replies.get(frame.step)
        if cached is not None:  # a re-sent step: answer again, never apply twice
            return [cached]
        if frame.step <= self.last_step:
            raise WireError(ErrorCode.DUPLICATE_STEP, f"step {frame.step} was applied long ago and is no longer cached")
        self._check_point(frame)
        assert self.spec is not None and self.optimizer_config is not None
        t0 = time.perf_counter()
        feats, labels = self._inputs(frame)
        feats.requires_grad_(True)
        for b in self.blocks:
            b.train(True)
        out = self._forward(feats, timed=True)
        loss, correct = self.spec.loss(out, labels)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optimizer is not None:
            set_lr(self.optimizer, self.optimizer_config.lr_at(frame.epoch))
            self.optimizer.step()
        grad = feats.grad if feats.grad is not None else torch.zeros_like(feats)
        grad_frame, _ = codecs.encode_tensor(grad, codecs.Codec.parse(frame.grad_codec or "fp32"))
        cloud_ms = (time.perf_counter() - t0) * 1e3
        self.step_ms.observe(cloud_ms)
        reply = Gradients(
            step=frame.step,
            tensor=grad_frame,
            loss=float(loss.detach()),
            correct=int(correct),
            count=int(labels.shape[0]),
            cloud_ms=cloud_ms,
            features_recv_ns=recv_ns,
            queue_depth=self.queue_depth,
        )
        self.replies[frame.step] = reply
        while len(self.replies) > REPLY_CACHE_SIZE:
            self.replies.popitem(last=False)
        self.last_step = frame.step
        self.applied_steps += 1
        out_frames: list[object] = []
        if self.config.context_every and self.applied_steps % self.config.context_every == 0:
            # Before the gradient: a small frame on an idle downlink is what lets the
            # device tell latency from bandwidth.
            out_frames.append(self.context(frame.step))
        out_frames.append(reply)
        return out_frames

    # ------------------------------------------------------------------- eval
    def _on_eval(self, frame: Features) -> list[object]:
        self._check_point(frame)
        assert self.spec is not None
        feats, labels = self._inputs(frame)
        for b in self.blocks:
            b.train(False)
        with torch.no_grad():
            out = self._forward(feats, timed=False)
            loss, correct = self.spec.loss(out, labels)
        n = int(labels.shape[0])
        self._eval["loss"] += float(loss) * n
        self._eval["correct"] += int(correct)
        self._eval["count"] += n
        return []

    def _on_epoch_end(self, frame: EpochEnd) -> list[object]:
        if frame.train:
            return []
        totals, self._eval = self._eval, {"loss": 0.0, "correct": 0, "count": 0}
        count = totals["count"]
        return [
            EvalResult(
                epoch=frame.epoch,
                loss=totals["loss"] / count if count else 0.0,
                correct=int(totals["correct"]),
                count=int(count),
            )
        ]

    # ------------------------------------------------------------ repartition
    def _tail_params(self) -> dict[str, torch.Tensor]:
        assert self.spec is not None
        return named_tensors(self.spec.model, range(self.point, self.spec.model.num_blocks))[0]

    def _on_weights(self, frame: Weights) -> list[object]:
        if self._incoming is None:
            self._incoming = StateAssembler()
        self._incoming.add(frame)
        return []

    def _on_repartition(self, frame: Repartition) -> list[object]:
        """Move the cut. The device has drained its in-flight steps before asking."""
        assert self.spec is not None
        model = self.spec.model
        new, old = frame.point, self.point
        if new not in model.cut_points or not (0 <= new < model.num_blocks):
            raise WireError(ErrorCode.PROTOCOL, f"cannot move the cut to {new}; valid: {[p for p in model.cut_points if p < model.num_blocks]}")
        state = optimizer_state_by_name(self.optimizer, self._tail_params())
        out: list[object] = []
        if new > old:  # blocks [old, new) go to the device
            out += export_state(model, range(old, new), state, step=frame.step)
        elif new < old:  # blocks [new, old) arrive from the device
            incoming, self._incoming = self._incoming, None
            expected = set(named_tensors(model, range(new, old))[0])
            tensors = incoming.tensors() if incoming is not None else {}
            missing = expected - {name for kind, name in tensors if kind == "param"}
            if missing:
                raise WireError(ErrorCode.MALFORMED, f"repartition to {new}: weights missing for {sorted(missing)[:5]}")
            state.update(import_state(model, tensors))
        self._set_point(new)
        if self.optimizer is not None:
            install_optimizer_state(self.optimizer, self._tail_params(), state)
        self.partition_history.append((frame.step, new))
        out.append(RepartitionAck(step=frame.step, point=new, accepted=True, message=f"cut moved {old} -> {new}"))
        return out

    # ---------------------------------------------------------------- context
    def context(self, step: int, *, request_recv_ns: int = 0) -> Context:
        """What the cloud knows about itself, for the device's decision engine.

        ``cloud_block_ms`` lists blocks ``[point, L)`` in order, each the block's
        share of the whole measured step (forward is timed per block, the backward
        is split in the same proportions). ``recv_ns`` is, for an answer to a
        request, when the request arrived (cloud clock): the device subtracts the
        time the cloud held it from the round trip.
        """
        fwd = [e.value_ms or 0.0 for e in self.block_ms]
        step_ms = self.step_ms.value_ms or 0.0
        total = sum(fwd)
        per_block = [f * step_ms / total for f in fwd] if total > 0 else fwd
        return Context(
            step=step,
            uplink_bps=0.0,
            downlink_bps=0.0,
            rtt_ms=0.0,
            cloud_step_ms=step_ms,
            cloud_block_ms=per_block,
            queue_depth=self.queue_depth,
            request=False,
            recv_ns=request_recv_ns,
        )
