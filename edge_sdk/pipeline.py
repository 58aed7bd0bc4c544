"""The edge pipeline: the feature-replay window and error feedback (sans-I/O).

This is the device half of one training step, written as a state machine that
takes events ("a batch is ready", "these gradients arrived") and returns the frames
to send. It never touches a socket, so every rule below is tested without one.

Feature replay (docs/design.md §1): the device keeps at most ``K + 1`` steps in flight
(``K`` = staleness bound; ``K = 0`` is plain sequential split learning). For each
in-flight step it keeps only

* the input batch and its labels (not the activations, not a weight copy),
* the codec error ``E = dequant(quant(f)) - f`` of the features it sent,
* the RNG state of the first forward, so dropout replays the same mask,
* with NoPeek on (:mod:`edge_sdk.privacy.defences`), the penalty's gradient at
  the features it sent, added to the cloud's gradient when that arrives.

When the gradient ``g`` of step ``j`` comes back, the head's forward is recomputed
on the stored input with the *current* weights, the gradient is corrected toward
the true features (``g - E * g * g``, a diagonal-curvature Taylor term as in
delay-compensated ASGD), back-propagated, and the head's optimizer steps with the
learning rate of step ``j``'s epoch.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from edge_sdk.migration import install_optimizer_state, optimizer_state_by_name
from edge_sdk.optim import OptimizerConfig, build_optimizer, set_lr
from edge_sdk.privacy.defences import CutDefence
from edge_sdk.runtime.base import HeadRuntime, LossFn
from schemas import codecs
from schemas.errors import ErrorCode, WireError
from schemas.frames import Features, Gradients


class StepAccountingError(WireError):
    """A gradient for a step that is not (or no longer) in flight."""


@dataclass
class InFlightStep:
    """What the device keeps for one step whose gradient has not come back yet."""

    step: int
    epoch: int
    x: torch.Tensor
    y: torch.Tensor
    error: torch.Tensor | None  # codec error E of the uploaded features
    rng_state: torch.Tensor
    started_ns: int
    defence_grad: torch.Tensor | None = None  # NoPeek's d penalty / d features, at the sent features


@dataclass
class StepResult:
    """Outcome of one applied gradient (for progress display and statistics)."""

    step: int
    epoch: int
    loss: float
    correct: int
    count: int
    cloud_ms: float
    round_trip_ms: float
    staleness: int  # how many head updates happened between the forward and this update


class ReplayWindow:
    """At most ``K + 1`` in-flight steps, in order, with exact step accounting.

    Step ids are issued in increasing order. A gradient for a step id that was
    applied already is a *duplicate*; one for a step id never issued is *unknown*.
    Both are refused, never applied.
    """

    def __init__(self, staleness: int) -> None:
        if staleness < 0:
            raise ValueError(f"staleness K must be >= 0, got {staleness}")
        self.staleness = staleness
        self._steps: OrderedDict[int, InFlightStep] = OrderedDict()
        self.next_step = 0

    @property
    def capacity(self) -> int:
        return self.staleness + 1

    def __len__(self) -> int:
        return len(self._steps)

    def has_room(self) -> bool:
        return len(self._steps) < self.capacity

    def push(self, item: InFlightStep) -> None:
        if not self.has_room():
            raise RuntimeError(f"replay window full ({self.capacity} steps in flight); wait for a gradient")
        if item.step != self.next_step:
            raise RuntimeError(f"step ids must be issued in order: expected {self.next_step}, got {item.step}")
        self._steps[item.step] = item
        self.next_step += 1

    def pop(self, step: int) -> InFlightStep:
        item = self._steps.pop(step, None)
        if item is not None:
            return item
        if 0 <= step < self.next_step:
            raise StepAccountingError(ErrorCode.DUPLICATE_STEP, f"gradient for step {step} was already applied")
        raise StepAccountingError(ErrorCode.UNKNOWN_STEP, f"gradient for step {step}, which was never sent")

    def steps(self) -> list[int]:
        return list(self._steps)

    def issue_local(self) -> int:
        """A step id for a step trained on the device alone (nothing in flight)."""
        if self._steps:
            raise RuntimeError(f"{len(self._steps)} steps in flight: drain before training locally")
        self.next_step += 1
        return self.next_step - 1


class StalenessGuard:
    """Caps the head's gradient norm when updates are stale (K > 0).

    Why: a gradient that comes back K steps late was taken against the tail as it
    was K steps ago; the tail (on the cloud, updated every step) has moved since.
    On mnist1d with the centralized recipe (SGD, lr 0.05, momentum 0.9) this made
    K = 4 collapse the head (dead ReLUs, chance accuracy) even with a 50x smaller
    head learning rate, while K = 0 trained fine; see bench/accuracy.py. Capping the
    norm at a running mean of the (capped) norms seen so far is scale-free (no
    per-model constant) and never lets one stale step jump further than the recent
    typical step. It is off for K = 0, where updates are exact.
    """

    def __init__(self, warmup: int = 5, alpha: float = 0.1) -> None:
        self.warmup = warmup
        self.alpha = alpha
        self._seen: list[float] = []
        self.threshold: float | None = None
        self.clipped = 0

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain JSON)."""
        return dict(seen=list(self._seen), threshold=self.threshold, clipped=self.clipped)

    def load_state(self, state: dict[str, Any]) -> None:
        self._seen = list(state["seen"])
        self.threshold = state["threshold"]
        self.clipped = int(state["clipped"])

    def apply(self, params: list[torch.Tensor]) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if not math.isfinite(norm):
            return norm
        if self.threshold is None:
            self._seen.append(norm)
            if len(self._seen) >= self.warmup:
                self.threshold = sorted(self._seen)[len(self._seen) // 2]
            return norm
        if norm > self.threshold:
            scale = self.threshold / norm
            for g in grads:
                g.mul_(scale)
            self.clipped += 1
            norm = self.threshold
        self.threshold = (1 - self.alpha) * self.threshold + self.alpha * norm
        return norm


class EdgePipeline:
    """Device side of split training for one partition point.

    ``runtime`` runs the head (eager, ExecuTorch, TorchScript); the pipeline owns
    the head's optimizer (built over the runtime's live parameters) so that the
    optimizer state can migrate when the cut moves.

    At ``point == num_blocks`` the "head" is the whole model: the device trains
    alone (:meth:`local_step`, the loss taken here with ``loss_fn``), nothing is
    in flight, and step ids go on counting so the cloud's accounting stays exact
    when the cut comes back.
    """

    def __init__(
        self,
        runtime: HeadRuntime,
        *,
        point: int,
        optimizer: OptimizerConfig,
        codec: str = "int8",
        grad_codec: str = "fp32",
        staleness: int = 0,
        error_feedback: bool = True,
        topk_ratio: float = 0.1,
        torch_optimizer: torch.optim.Optimizer | None = None,
        staleness_guard: bool = True,
        num_blocks: int | None = None,
        loss_fn: LossFn | None = None,
        defence: CutDefence | None = None,
        defence_seed: int = 0,
    ) -> None:
        self.runtime = runtime
        #: what the device does to its features before they leave (noise, NoPeek)
        self.defence = defence or CutDefence()
        self._defence_seed = defence_seed
        self._noise = self.defence.noise_source(defence_seed)
        self.point = point
        self.num_blocks = num_blocks
        self.loss_fn = loss_fn
        self.optimizer_config = optimizer
        self.codec = codecs.Codec.parse(codec)
        self.grad_codec = codecs.Codec.parse(grad_codec)
        self.error_feedback = error_feedback
        self.topk_ratio = topk_ratio
        self.window = ReplayWindow(staleness)
        self.guard = StalenessGuard() if staleness_guard else None
        params = runtime.parameters()
        self.optimizer = (
            torch_optimizer if torch_optimizer is not None else (build_optimizer(params, optimizer) if params else None)
        )
        self.updates = 0  # head optimizer steps taken so far
        self._updates_at_start: dict[int, int] = {}
        self.steps_applied = 0  # gradients applied plus steps trained alone

    # ----------------------------------------------------------------- state
    @property
    def staleness(self) -> int:
        return self.window.staleness

    @property
    def in_flight(self) -> int:
        return len(self.window)

    def can_start(self) -> bool:
        return self.window.has_room()

    @property
    def device_only(self) -> bool:
        """The whole model runs here (no cloud blocks, no link per step)."""
        return self.num_blocks is not None and self.point >= self.num_blocks

    @property
    def next_step(self) -> int:
        return self.window.next_step

    # ---------------------------------------------------------------- events
    def start_step(self, x: torch.Tensor, y: torch.Tensor, *, epoch: int) -> Features:
        """First forward of a new step: returns the ``Features`` frame to upload."""
        if self.device_only:
            raise RuntimeError("the device trains alone at this point: use local_step")
        if not self.window.has_room():
            raise RuntimeError(f"{self.in_flight} steps already in flight (K={self.staleness}); apply a gradient first")
        rng_state = torch.get_rng_state()
        feats = self.runtime.forward(x, train=True)
        defence_grad = self.defence.penalty_gradient(x, feats)
        frame, error = codecs.encode_tensor(self._noise(feats), self.codec, topk_ratio=self.topk_ratio)
        step = self.window.next_step
        self.window.push(
            InFlightStep(
                step=step,
                epoch=epoch,
                x=x,
                y=y,
                error=error if (self.error_feedback and self.codec != codecs.Codec.NONE) else None,
                rng_state=rng_state,
                started_ns=time.monotonic_ns(),
                defence_grad=defence_grad,
            )
        )
        self._updates_at_start[step] = self.updates
        return self._features(step, epoch, frame, y, train=True)

    def _features(self, step: int, epoch: int, frame: codecs.TensorFrame, y: torch.Tensor, *, train: bool) -> Features:
        return Features(
            step=step,
            epoch=epoch,
            point=self.point,
            tensor=frame,
            labels=codecs.tensor_frame_from_tensor(y),
            train=train,
            grad_codec=self.grad_codec.label,
        )

    def on_gradients(self, frame: Gradients) -> StepResult:
        """Replay the head on the stored input and apply the returned gradient."""
        if frame.tensor is None:
            raise StepAccountingError(ErrorCode.PROTOCOL, f"gradients for step {frame.step} carry no tensor")
        item = self.window.pop(frame.step)
        grad = self.corrected_gradient(codecs.decode_tensor(frame.tensor), item.error)
        if item.defence_grad is not None:
            if item.defence_grad.shape != grad.shape:
                raise StepAccountingError(
                    ErrorCode.BAD_TENSOR, f"gradient shape {tuple(grad.shape)} != feature shape {tuple(item.defence_grad.shape)}"
                )
            grad = grad + item.defence_grad
        self.apply(item, grad)
        self.steps_applied += 1
        stale = self.updates - 1 - self._updates_at_start.pop(item.step)
        return StepResult(
            step=item.step,
            epoch=item.epoch,
            loss=frame.loss,
            correct=frame.correct,
            count=frame.count,
            cloud_ms=frame.cloud_ms,
            round_trip_ms=(time.monotonic_ns() - item.started_ns) / 1e6,
            staleness=stale,
        )

    def local_step(self, x: torch.Tensor, y: torch.Tensor, *, epoch: int) -> StepResult:
        """One step of device-only training: forward, loss, backward, optimizer step."""
        if not self.device_only or self.loss_fn is None:
            raise RuntimeError(f"point {self.point} is a split: start_step, then on_gradients")
        step = self.window.issue_local()
        loss, correct = self.runtime.train_step(x, y, self.loss_fn)
        if self.optimizer is not None:
            set_lr(self.optimizer, self.optimizer_config.lr_at(epoch))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.steps_applied += 1
        return StepResult(step, epoch, loss, correct, int(y.shape[0]), cloud_ms=0.0, round_trip_ms=0.0, staleness=0)

    def local_eval(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        """Device-only evaluation of one batch: (summed loss, correct, count)."""
        if not self.device_only or self.loss_fn is None:
            raise RuntimeError(f"point {self.point} is a split: evaluate through eval_features")
        with torch.no_grad():
            loss, correct = self.loss_fn(self.runtime.forward(x, train=False), y)
        n = int(y.shape[0])
        return float(loss) * n, int(correct), n

    def eval_features(self, x: torch.Tensor, y: torch.Tensor, *, epoch: int, batch: int) -> Features:
        """Eval-mode forward; the cloud answers with loss and correct count only."""
        feats = self._noise(self.runtime.forward(x, train=False))
        frame, _ = codecs.encode_tensor(feats, self.codec, topk_ratio=self.topk_ratio)
        return self._features(batch, epoch, frame, y, train=False)

    def switch(
        self,
        runtime: HeadRuntime,
        *,
        point: int,
        codec: str | None = None,
        staleness: int | None = None,
        optimizer_state: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Move to a new partition point (repartitioning), keeping step accounting.

        Only legal with no step in flight: a gradient computed for the old cut
        cannot be applied to the new head. ``optimizer_state`` maps full parameter
        names to their optimizer state (kept local state plus migrated state), so
        momentum and Adam moments survive the move.
        """
        if self.in_flight:
            raise RuntimeError(f"cannot repartition with {self.in_flight} steps in flight; drain first")
        next_step = self.window.next_step
        self.runtime = runtime
        if point != self.point:  # another cut, another feature scale
            self._noise = self.defence.noise_source(self._defence_seed + point)
        self.point = point
        if codec is not None:
            self.codec = codecs.Codec.parse(codec)
        self.window = ReplayWindow(self.staleness if staleness is None else staleness)
        self.window.next_step = next_step
        named = runtime.named_parameters()
        self.optimizer = build_optimizer(list(named.values()), self.optimizer_config) if named else None
        if self.optimizer is not None and optimizer_state:
            install_optimizer_state(self.optimizer, named, optimizer_state)

    def roll_back(
        self,
        runtime: HeadRuntime,
        *,
        point: int,
        codec: str,
        staleness: int,
        next_step: int,
        steps_applied: int,
        updates: int,
        optimizer_state: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        """Return to a checkpoint: the steps in flight are abandoned (both sides go
        back to ``next_step``, where nothing was in flight), the head is
        ``runtime`` (holding the checkpoint's weights) with its optimizer state."""
        self.window = ReplayWindow(staleness)
        self._updates_at_start.clear()
        self.switch(runtime, point=point, codec=codec, staleness=staleness, optimizer_state=optimizer_state)
        self.window.next_step = next_step
        self.steps_applied = steps_applied
        self.updates = updates

    def optimizer_state_by_name(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-parameter optimizer state keyed by full parameter name."""
        return optimizer_state_by_name(self.optimizer, self.runtime.named_parameters())

    # ------------------------------------------------------------- the rules
    @staticmethod
    def error_feedback_correction(grad: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """``g - E * g * g``: first-order correction of a gradient taken at
        ``f + E`` back toward ``f``, with the Hessian diagonal approximated by
        ``g * g`` (delay-compensated ASGD's approximation)."""
        return grad - error * grad * grad

    def corrected_gradient(self, grad: torch.Tensor, error: torch.Tensor | None) -> torch.Tensor:
        if error is None:
            return grad
        if error.shape != grad.shape:
            raise StepAccountingError(
                ErrorCode.BAD_TENSOR, f"gradient shape {tuple(grad.shape)} != feature shape {tuple(error.shape)}"
            )
        return self.error_feedback_correction(grad, error)

    def apply(self, item: InFlightStep, grad: torch.Tensor) -> None:
        """Replay forward with the current weights, back-propagate, step."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(item.rng_state)
            self.runtime.replay_backward(item.x, grad)
        if self.guard is not None and self.staleness > 0:
            self.guard.apply(self.runtime.parameters())
        if self.optimizer is not None:
            set_lr(self.optimizer, self.optimizer_config.lr_at(item.epoch))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
