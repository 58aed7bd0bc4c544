"""The device's training session: the protocol as a sans-I/O state machine.

This is the device twin of `cloud_backend.session.CloudSession`. It owns the
feature-replay pipeline, the context tracker, the decision controller and the
run's records, and it never touches a socket, a thread or a clock. The transport
(`edge_sdk.client.EdgeClient` over WebSockets, `edge_sdk.emulation.inprocess` by
function calls in tests) drives it.

Why a generator of commands rather than one callback per event: the device's
protocol is a *sequence* (handshake, probes, the start-up decision, steps, drains,
the repartition exchange, evaluation), and each part waits for particular frames.
Written as generators, that sequence reads top to bottom, and every place the
session needs the outside world is one ``yield``:

* ``yield Send(frame)``      -> `Sent` (when it left, how many bytes)
* ``yield Receive(wait)``    -> `Received`, `Closed`, or None (``wait=False``, nothing arrived)
* ``yield Compute(fn, ...)`` -> `Computed` (the value, device busy time, CPU time)
* ``yield Now()``            -> the transport's clock, in seconds
* ``yield Reconnect(why)``   -> `Reconnected` or `Closed` (the link dropped: dial again)

Events in (frames, compute results, the time), frames and work out: the same
split as ``websockets``' ``protocol.py`` and ``asyncio/connection.py``. Entry
points are `EdgeSession.run` (a whole run), and the pieces a test drives on its
own: `handshake`, `train_batch`, `drain`, `switch`, `evaluate`.

The scheduling rule (what to do with the next batch) is `next_move`, a pure
function with its own unit tests.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, TypeVar

import torch

from edge_sdk import repartition
from edge_sdk.checkpoints import CheckpointStore, unflatten_optimizer_state
from edge_sdk.context import ContextTracker, LinkChangeDetector
from edge_sdk.decision.controller import DecisionController
from edge_sdk.decision.cost_model import Choice
from edge_sdk.decision.setup import initial_choice
from edge_sdk.device_checkpoint import SECRET_FIELDS, DeviceCheckpoint
from edge_sdk.hello import hello_frame
from edge_sdk.migration import named_tensors
from edge_sdk.pipeline import EdgePipeline, StepResult
from edge_sdk.runtime import EagerRuntime, HeadRuntime, load_runtime
from edge_sdk.training import LocalSetup, TrainConfig, TrainResult
from schemas import frames as fr
from schemas.codecs import Codec

log = logging.getLogger("edge_sdk")

T = TypeVar("T")

#: while training alone, probe the link this often (s), with at least this many filler bytes
PROBE_EVERY_S = 2.0
PROBE_MIN_BYTES = 2048
#: probes (small and padded alternating) before the engine's start-up decision: at
#: least the first number, at most the second; past the minimum only while more
#: could change the choice (`DecisionController.initial_settled`) and the probing
#: has taken less than the budget (s). With the handshake's three RTT probes one
#: padded probe gives each direction's delay fit its two sizes
#: (`decision.controller.START_MIN_SAMPLES`): enough when the choice is clear even
#: with the link 4x off (device-only against a 250 kbit/s link), and near-ties
#: probe on. On WiFi a probe takes ~35 ms, on a 250 kbit/s link ~0.25 s
INITIAL_PROBES = (1, 14)
INITIAL_PROBE_BUDGET_S = 1.0
#: while training alone, the cloud's compute figures (from before) are trusted this
#: long (s), then forgotten for the profile's, so a cloud that was slow and
#: recovered can win the cut back; doubled each time (a cloud still slow costs
#: the engine one dwell per forgetting, ever rarer)
CLOUD_ESTIMATE_TTL_S = 60.0


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is meant for the user as is."""


class Stopped(Exception):
    """The run was asked to stop (`EdgeSession.request_stop`: Ctrl-C, SIGTERM) and did,
    at a step boundary with nothing in flight and, where the cloud keeps them, a
    checkpoint agreed there: ``--resume`` carries on from exactly this step."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RolledBack(Exception):
    """Both sides went back to the device's checkpoint (the cloud restarted from
    its own): the run carries on from that checkpoint's position in the data."""

    def __init__(self, checkpoint: DeviceCheckpoint) -> None:
        super().__init__(f"rolled back to step {checkpoint.step}")
        self.checkpoint = checkpoint


# ------------------------------------------------------------------ commands
@dataclass(frozen=True)
class Send:
    """Send ``frame`` to the cloud (the transport wraps it in an `Envelope`)."""

    frame: fr.Frame


@dataclass(frozen=True)
class Sent:
    """The answer to `Send`: when the envelope was stamped, and its size on the wire."""

    sent_ns: int
    nbytes: int


@dataclass(frozen=True)
class Receive:
    """The next frame from the cloud; ``wait=False`` only takes one that has already arrived."""

    wait: bool = True


@dataclass(frozen=True)
class Received:
    """A decoded envelope, when it arrived, and its size on the wire."""

    envelope: fr.Envelope
    recv_ns: int
    nbytes: int


@dataclass(frozen=True)
class Closed:
    """The link is gone (or the cloud sent something undecodable); ``reason`` is for the user."""

    reason: str


@dataclass(frozen=True)
class Compute:
    """Run ``fn(*args, **kwargs)`` where the device computes (off the event loop)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: emulation: whether the device slowdown applies (training and evaluation
    #: compute); the migration's bookkeeping runs at host speed
    scaled: bool = True


@dataclass(frozen=True)
class Computed:
    """The answer to `Compute`: the value, the device's busy time (slowdown and
    hand-offs included: that, not the kernel time alone, limits the pipeline), and
    the CPU time of the thread that ran it."""

    value: Any
    busy_s: float
    cpu_s: float


@dataclass(frozen=True)
class Now:
    """Read the transport's monotonic clock (answered with seconds, a float)."""


@dataclass(frozen=True)
class Reconnect:
    """The link dropped (``reason``): dial again, with backoff, within the run's
    reconnect timeout counted from the drop. Answered with `Reconnected`, or
    `Closed` when it gave up. ``first``: a new drop (not a dial again because the
    last new connection dropped before the resume went through), which restarts
    the timeout and the backoff. Frames still queued for the old connection are
    dropped: the session re-sends what the protocol needs."""

    reason: str
    first: bool = True


@dataclass(frozen=True)
class Reconnected:
    """A fresh connection; nothing has been said on it yet."""


Command = Send | Receive | Compute | Now | Reconnect
#: a session coroutine: yields commands, is sent their answers, returns ``T``
Steps = Generator[Command, Any, T]


def _write_checkpoint(checkpoint: DeviceCheckpoint, store: CheckpointStore) -> tuple[int, float, str]:
    """Write the device's half to disk: (bytes, seconds, error text or "")."""
    try:
        nbytes, seconds = checkpoint.save(store)
    except OSError as exc:
        return 0, 0.0, exc.strerror or str(exc)
    return nbytes, seconds, ""


# ----------------------------------------------------------- scheduling rule
class Next(Enum):
    """What the session does next with the batch in hand."""

    ALONE = "train the batch on the device alone"
    POLL = "apply one frame that has already arrived, if any"
    WAIT = "wait for a frame: the window is full"
    START = "start the split step"


def next_move(*, device_only: bool, polled: bool, window_full: bool) -> Next:
    """The rule for one batch: apply at most one frame that already arrived, wait
    only while the window is full, then start the step.

    Why at most one: applying *every* waiting gradient first lets the window run
    dry; steps then travel in convoys of K+1 and the device idles while the first
    of each convoy makes its round trip (measured: 46 vs 39 ms/step on wifi at p=1
    K=2), which is the latency replay should hide. A device-only placement never
    waits for the link.
    """
    if device_only:
        return Next.ALONE
    if not polled:
        return Next.POLL
    if window_full:
        return Next.WAIT
    return Next.START


# --------------------------------------------------------------- bookkeeping
@dataclass
class ProgressEvent:
    """Handed to the progress callback after every applied step."""

    epoch: int
    step: int
    loss: float
    accuracy: float
    steps_per_s: float
    result: StepResult | None = None


@dataclass
class RunningMeans:
    """Loss, accuracy and per-step timings over the steps of one epoch."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    cloud_ms: list[float] = field(default_factory=list)
    rtt_ms: list[float] = field(default_factory=list)

    def add(self, r: StepResult, *, split: bool = True) -> None:
        self.loss_sum += r.loss * r.count
        self.correct += r.correct
        self.count += r.count
        if split:  # a step trained alone has no cloud time and no round trip
            self.cloud_ms.append(r.cloud_ms)
            self.rtt_ms.append(r.round_trip_ms)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")


class EdgeSession:
    """One training run of one device against one cloud, as a state machine.

    ``controller`` is the decision engine (None: a static run); building it
    profiles the device, which is the caller's explicit step
    (`edge_sdk.decision.setup.build_controller`), not this constructor's.
    ``shared_clock``: both ends read the same monotonic clock (emulation), so
    one-way delays are directly measurable; on a real link only their
    differences are.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        setup: LocalSetup,
        *,
        controller: DecisionController | None = None,
        progress: Callable[[ProgressEvent], None] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        shared_clock: bool = False,
        resume_from: DeviceCheckpoint | None = None,
    ) -> None:
        self.cfg = cfg
        self.setup = setup
        self.progress = progress
        self.on_epoch = on_epoch  # handed each epoch's record (`TrainResult.history`)
        self.shared_clock = shared_clock
        self.session_id = 0  # the cloud's, from HelloAck
        self.resume_token = ""  # from HelloAck: presented to re-attach after a drop
        #: a dropped link is survived (re-dial, resume) outside the handshake, a
        #: repartition and the goodbye, whose exchanges are not idempotent
        self._resumable = False
        #: one entry per survived drop: step, reason, seconds without a link, steps re-sent
        self.reconnects: list[dict[str, Any]] = []
        #: step -> its Features frame, until the gradient is applied: what a resume re-sends
        self._unacked: dict[int, fr.Features] = {}
        #: the cloud keeps checkpoints (HelloAck): agree on them at epoch ends and every N steps
        self._checkpointing = False
        #: the newest checkpoint both sides hold (in memory; on disk too with --checkpoint-dir)
        self.checkpoint: DeviceCheckpoint | None = None
        #: a device checkpoint to carry on from (``--resume``): the process that made it died
        self.resume_from = resume_from
        self.checkpoint_store = CheckpointStore(cfg.checkpoint_dir, keep=1) if cfg.checkpoint_dir else None
        #: checkpoints agreed so far, and what the device's own writes cost
        self.checkpoint_stats: dict[str, Any] = dict(saved=0, step=-1, bytes=0, write_s=0.0)
        self._checkpoint_asked = 0  # step of the latest request, saved or not: the next is N steps on
        #: one entry per roll back to a checkpoint: from which step, to which, why
        self.rollbacks: list[dict[str, Any]] = []
        #: set from outside (a signal handler): stop before the next batch
        self.stop_reason: str | None = None
        self._cloud_ttl_s = CLOUD_ESTIMATE_TTL_S
        self._alone_since: float | None = None  # run time the cloud's figures were last current, alone
        self.choice = initial_choice(cfg, setup)
        self.controller = controller
        if controller is not None:
            controller.current = self.choice
        self.runtime = self.make_runtime(self.choice.point)
        self.pipeline = EdgePipeline(
            self.runtime,
            point=self.choice.point,
            optimizer=cfg.optimizer_config(),
            codec=self.choice.codec,
            grad_codec=cfg.grad_codec,
            staleness=self.choice.staleness,
            error_feedback=cfg.error_feedback,
            topk_ratio=cfg.topk_ratio,
            staleness_guard=cfg.staleness_guard,
            num_blocks=setup.spec.model.num_blocks,
            loss_fn=setup.spec.loss,
            defence=cfg.cut_defence,
            defence_seed=cfg.seed,
        )
        self.tracker = ContextTracker()
        self.link_change = LinkChangeDetector()
        #: the same for the padded probes while the device trains alone, both ways
        self.probe_change = LinkChangeDetector(window=8, warmup=3, min_jump_s=0.05, faster=True)
        self.link_changes: list[int] = []  # steps at which the link was seen to change
        self.edge_busy_s = 0.0  # device time including emulated slowdown
        self.step_times: list[float] = []  # seconds since the run started, per applied step
        self.one_way_ms: dict[str, list[float]] = {"up": [], "down": []}
        self.last_migration: list[fr.Weights] = []  # the Weights frames of the latest repartition
        self.result: TrainResult | None = None  # the run's report, filled in as it goes
        self.trained_choice = self.choice  # the configuration at the end of the epochs
        #: applied steps per configuration ("p=2 int8 K=4": n), for the summary
        self.steps_by_choice: dict[str, int] = {}
        self._t_run = 0.0  # the run's time base (transport clock at its start)
        self._last: Computed = Computed(None, 0.0, 0.0)  # the latest compute's timing
        self._last_recv: tuple[int, int, int] = (0, 0, 0)  # (peer sent_ns, our recv_ns, bytes) of the last frame
        self._sent: dict[int, Sent] = {}  # step -> its Features upload
        self._step_compute: dict[int, Computed] = {}  # step -> timing of its forward
        #: step -> (sent_ns, bytes, padded) of the Context requests waiting for an answer, in order
        self._context_requests: dict[int, deque[tuple[int, int, bool]]] = {}
        self._last_probe_s = -math.inf
        self._interval_reset = False  # the next interval spans a switch: not a step time
        self._probes = 0
        self._means = RunningMeans()
        self._epoch = 0
        self._t_train = 0.0  # when training started (progress rate)

    @property
    def resumes(self) -> int:
        """Drops survived so far; a wait compares it to tell that its request may be lost."""
        return len(self.reconnects)

    # ----------------------------------------------------------- runtimes
    def make_runtime(self, point: int) -> HeadRuntime:
        model = self.setup.spec.model
        if self.cfg.runtime == "eager":
            return EagerRuntime(model.head(point), name_map=model.head_name_map(point))
        assert self.cfg.programs is not None  # TrainConfig.validate: program runtimes need --programs
        return load_runtime(self.cfg.runtime, self.cfg.programs, point, model.state_dict())

    def sync_head_to_model(self) -> None:
        """Copy a program runtime's live weights and statistics into the model
        (eager runtimes train the model's own tensors, nothing to do)."""
        if isinstance(self.runtime, EagerRuntime):
            return
        state = self.setup.spec.model.state_dict()
        with torch.no_grad():
            for name, t in {**self.runtime.named_parameters(), **self.runtime.named_buffers()}.items():
                state[name].copy_(t)

    # ----------------------------------------------------- I/O primitives
    def _send(self, frame: fr.Frame) -> Steps[Sent]:
        sent: Sent = yield Send(frame)
        return sent

    def _now(self) -> Steps[float]:
        """Seconds since the run started, on the transport's clock."""
        now: float = yield Now()
        return now - self._t_run

    def _receive(self, *, wait: bool = True) -> Steps[fr.Frame | None]:
        """The next frame; None when ``wait=False`` and nothing arrived, or when the
        link dropped and was resumed meanwhile (what the caller waited for may need
        asking again: `resumes` counts). An Error frame, or a drop where the
        exchange is not resumable, ends the run with the reason."""
        got = yield Receive(wait)
        if got is None:
            return None
        if isinstance(got, Closed):
            if not self._resumable:
                raise TrainingError(got.reason)
            yield from self._resume(got.reason)
            return None
        self._last_recv = (got.envelope.sent_ns, got.recv_ns, got.nbytes)
        frame = got.envelope.frame
        if isinstance(frame, fr.Error):
            raise TrainingError(f"cloud refused: {frame.message} ({frame.code.name})")
        return frame

    def _resume(self, reason: str) -> Steps[None]:
        """Dial again, re-attach to the session with its resume token, and re-send
        every step whose gradient has not been applied. The cloud answers those it
        applied already from its reply cache and applies the rest, once."""
        t0 = yield from self._now()
        first = True
        while True:
            got = yield Reconnect(reason, first=first)
            first = False
            if isinstance(got, Closed):
                raise TrainingError(f"{reason}; gave up reconnecting: {got.reason}")
            got_ack = yield from self._resume_hello(reason, restart=False)
            if isinstance(got_ack, Closed):
                reason = got_ack.reason  # dropped again at once: dial again
                continue
            ack = got_ack
            break
        self._context_requests.clear()  # their answers went down with the old link
        if ack.restored_step >= 0:  # the cloud restarted: both sides go back to the checkpoint
            assert self.checkpoint is not None  # _resume_hello checked the step is ours
            outage_s = (yield from self._now()) - t0
            self.reconnects.append(
                dict(step=self.pipeline.next_step, reason=reason, outage_s=outage_s, resent=0, cloud_last_step=ack.last_step)
            )
            self._note_rollback(self.checkpoint, reason, outage_s)
            raise RolledBack(self.checkpoint)
        for step in sorted(self._unacked):
            self._sent[step] = yield from self._send(self._unacked[step])
        self._interval_reset = True  # the outage is not a step time
        outage_s = (yield from self._now()) - t0
        self.reconnects.append(
            dict(
                step=self.pipeline.next_step,
                reason=reason,
                outage_s=outage_s,
                resent=len(self._unacked),
                cloud_last_step=ack.last_step,
            )
        )
        log.info("resumed after %.2f s (%s); re-sent %d steps", outage_s, reason, len(self._unacked))

    def _resume_hello(self, reason: str, *, restart: bool) -> Steps[fr.HelloAck | Closed]:
        """Present the session's resume token (and the newest checkpoint held) on a
        fresh connection; the cloud's answer, or `Closed` if this link dropped too.
        ``restart``: this process carries on from that checkpoint (the one that
        made it died), so the cloud must roll back to it."""
        held = self.checkpoint.step if self.checkpoint is not None else -1
        hello = replace(
            self.hello(),
            resume_session=self.session_id,
            resume_token=self.resume_token,
            resume_step=held,
            resume_restart=restart,
        )
        yield from self._send(hello)
        reply = yield Receive(True)
        if isinstance(reply, Closed):
            return reply
        assert isinstance(reply, Received)
        self._last_recv = (reply.envelope.sent_ns, reply.recv_ns, reply.nbytes)
        ack = reply.envelope.frame
        if isinstance(ack, fr.Error):
            raise TrainingError(f"{reason}; the cloud refused to resume: {ack.message} ({ack.code.name})")
        if not isinstance(ack, fr.HelloAck) or not ack.resumed:
            raise TrainingError(f"{reason}; the cloud answered the resume with {type(ack).__name__}")
        if ack.restored_step >= 0 and ack.restored_step != held:
            raise TrainingError(f"{reason}; the cloud restored step {ack.restored_step}, the device holds step {held}")
        if restart and ack.restored_step != held:
            raise TrainingError(f"{reason}; the cloud did not roll back to the device's checkpoint of step {held}")
        self._checkpointing = ack.checkpoints
        return ack

    def request_stop(self, reason: str) -> None:
        """Stop at the next batch: the steps in flight are finished, a checkpoint is
        agreed there (if the cloud keeps them) and the run raises `Stopped`. Safe
        to call from a signal handler: it only sets a flag."""
        self.stop_reason = reason

    def _stop_here(self, epoch: int, batch: int) -> Steps[None]:
        assert self.stop_reason is not None
        yield from self.drain(adapt=False)
        if self.checkpoint is None or self.checkpoint.step != self.pipeline.next_step:
            yield from self._checkpoint(epoch, batch)
        raise Stopped(self.stop_reason)

    # --------------------------------------------------------- checkpoints
    def _checkpoint(self, epoch: int, batch: int) -> Steps[None]:
        """Agree a checkpoint with the cloud at the next step: drain, ask the cloud to
        save, and keep the device's state only once it did (so the cloud always holds
        the device's newest). ``epoch``/``batch``: the next batch to train."""
        if not self._checkpointing:
            return
        yield from self.drain(adapt=False)
        step = self._checkpoint_asked = self.pipeline.next_step
        while True:
            resumes = self.resumes
            yield from self._send(fr.Checkpoint(step=step, epoch=epoch))
            ack: fr.CheckpointAck | None = None
            while ack is None and self.resumes == resumes:  # a resume lost the request: ask again
                frame = yield from self._receive()
                if isinstance(frame, fr.CheckpointAck) and frame.step == step:
                    ack = frame
                elif frame is not None:
                    yield from self._apply(frame)
            if ack is not None:
                break
        if not ack.saved:
            log.warning("step %d: no checkpoint: %s", step, ack.message)
            return
        self.checkpoint = self._capture(step, epoch, batch)
        self.checkpoint_stats["saved"] += 1
        self.checkpoint_stats["step"] = step
        if self.checkpoint_store is not None:
            nbytes, seconds, error = yield from self._compute(
                _write_checkpoint, self.checkpoint, self.checkpoint_store, train=False, scaled=False
            )
            if error:  # the cloud's half and the one in memory still cover a cloud restart
                log.warning("warning: cannot write the checkpoint of step %d to %s: %s", step, self.cfg.checkpoint_dir, error)
            self.checkpoint_stats["bytes"] = nbytes
            self.checkpoint_stats["write_s"] += seconds

    def _capture(self, step: int, epoch: int, batch: int) -> DeviceCheckpoint:
        self.sync_head_to_model()
        model = self.setup.spec.model
        point = self.pipeline.point
        params, buffers = named_tensors(model, range(point))
        result = self.result or TrainResult()
        config = {k: v for k, v in asdict(self.cfg).items() if k not in SECRET_FIELDS}
        guard = self.pipeline.guard
        manifest = dict(
            session=self.session_id,
            resume_token=self.resume_token,
            config=config,
            point=point,
            codec=self.pipeline.codec.label,
            staleness=self.pipeline.staleness,
            steps_applied=self.pipeline.steps_applied,
            updates=self.pipeline.updates,
            guard=None if guard is None else guard.state(),
            means=dict(loss_sum=self._means.loss_sum, correct=self._means.correct, count=self._means.count),
            history=list(result.history),
            timeline=list(result.timeline),
            train_s=result.train_s,
            steps_by_choice=dict(self.steps_by_choice),
            step_times=list(self.step_times),
        )
        return DeviceCheckpoint.capture(
            step=step,
            epoch=epoch,
            batch=batch,
            head={**params, **buffers},
            optimizer_state=self.pipeline.optimizer_state_by_name(),
            manifest=manifest,
        )

    def _roll_back(self, checkpoint: DeviceCheckpoint) -> None:
        """Put the device back where ``checkpoint`` was taken: head, optimizer,
        counters, RNG and the run's records; what was in flight is abandoned
        (the cloud went back to the same step)."""
        m = checkpoint.manifest
        model = self.setup.spec.model
        state = model.state_dict()
        with torch.no_grad():
            for name, t in checkpoint.head.items():
                state[name].copy_(t)
        point = int(m["point"])
        moved = point != self.pipeline.point
        runtime = self.make_runtime(point)
        self.pipeline.roll_back(
            runtime,
            point=point,
            codec=str(m["codec"]),
            staleness=int(m["staleness"]),
            next_step=checkpoint.step,
            steps_applied=int(m["steps_applied"]),
            updates=int(m["updates"]),
            optimizer_state=unflatten_optimizer_state(checkpoint.tensors),
        )
        self.runtime = runtime
        guard = self.pipeline.guard
        if guard is not None and m.get("guard") is not None:
            guard.load_state(m["guard"])
        torch.set_rng_state(checkpoint.tensors["rng"])
        self.choice = Choice(point, str(m["codec"]), int(m["staleness"]))
        if self.controller is not None:
            self.controller.current = self.choice
            self.controller.switched(self.pipeline.steps_applied)
        if moved:
            self.tracker.reset_compute()
        self._unacked.clear()
        self._sent.clear()
        self._step_compute.clear()
        self._context_requests.clear()
        means = m["means"]
        self._means = RunningMeans(loss_sum=float(means["loss_sum"]), correct=int(means["correct"]), count=int(means["count"]))
        if self.result is not None:
            self.result.history = list(m["history"])
            self.result.timeline = list(m["timeline"])
        self.steps_by_choice = dict(m["steps_by_choice"])
        self.step_times = list(m["step_times"])
        self.tracker.reset_step_interval()
        self._interval_reset = True

    def _note_rollback(self, checkpoint: DeviceCheckpoint, reason: str, outage_s: float) -> None:
        self.rollbacks.append(dict(from_step=self.pipeline.next_step, to_step=checkpoint.step, reason=reason, outage_s=outage_s))
        log.warning(
            "the cloud restarted from its checkpoint: rolled back from step %d to step %d (epoch %d, batch %d)",
            self.pipeline.next_step,
            checkpoint.step,
            checkpoint.epoch + 1,
            checkpoint.batch,
        )

    def _compute(self, fn: Callable[..., T], *args: Any, train: bool = True, scaled: bool = True, **kwargs: Any) -> Steps[T]:
        done: Computed = yield Compute(fn, args, kwargs, scaled)
        if train:
            self.edge_busy_s += done.busy_s
        self._last = done
        return done.value

    # ------------------------------------------------------------- protocol
    def hello(self) -> fr.Hello:
        return hello_frame(
            self.setup.spec,
            point=self.choice.point,
            codec=self.choice.codec,
            staleness=self.choice.staleness,
            optimizer=self.cfg.optimizer_config(),
            batch_size=self.cfg.batch_size,
            token=self.cfg.token,
            runtime=self.runtime.name,
            # programs say which model config they were exported from; the cloud checks it
            program_hash=str(self.setup.manifest.get("config_hash", "")) if self.setup.manifest else "",
        )

    def handshake(self) -> Steps[None]:
        yield from self._send(self.hello())
        frame = yield from self._receive()
        if not isinstance(frame, fr.HelloAck) or not frame.accepted:
            raise TrainingError(f"cloud did not accept the session: {getattr(frame, 'message', type(frame).__name__)}")
        self.session_id = frame.session
        self.resume_token = frame.resume_token
        self._checkpointing = frame.checkpoints
        if self.checkpoint_store is not None and not frame.checkpoints:
            log.warning(
                "warning: the cloud keeps no checkpoints (start it with `serve --state-dir`), so nothing is saved "
                "to --checkpoint-dir and this run cannot be resumed after a crash"
            )

    def _apply(self, frame: fr.Frame | None, *, adapt: bool = True) -> Steps[StepResult | None]:
        """Act on one frame from the cloud; a Gradients frame completes its step."""
        if isinstance(frame, fr.Context):
            self._observe_context(frame)
            return None
        if isinstance(frame, fr.Gradients):
            self._unacked.pop(frame.step, None)
            self._observe_gradients(frame)
            result = yield from self._compute(self.pipeline.on_gradients, frame)
            forward = self._step_compute.pop(result.step, Computed(None, 0.0, 0.0))
            busy_s, cpu_s = forward.busy_s + self._last.busy_s, forward.cpu_s + self._last.cpu_s
            yield from self._applied(result, busy_s, cpu_s, adapt=adapt)
            return result
        return None  # other informational frames

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> Steps[None]:
        """One batch: by `next_move`, apply what arrived, wait for room, then start
        its split step (or train it alone). Its gradient is applied later."""
        self._epoch = epoch
        polled = False
        while True:
            move = next_move(device_only=self.pipeline.device_only, polled=polled, window_full=not self.pipeline.can_start())
            if move is Next.ALONE:
                yield from self._train_alone(x, y, epoch)
                return
            if move is Next.POLL:
                polled = True
                frame = yield from self._receive(wait=False)
                if frame is not None:
                    yield from self._apply(frame)
                continue
            if move is Next.WAIT:
                yield from self._apply((yield from self._receive()))
                continue
            break
        if self.pipeline.next_step % self.cfg.decide_every == 0:
            yield from self._request_context()
        feats = yield from self._compute(self.pipeline.start_step, x, y, epoch=epoch)
        self._step_compute[feats.step] = self._last
        self._unacked[feats.step] = feats
        self._sent[feats.step] = yield from self._send(feats)

    def _train_alone(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> Steps[None]:
        """One device-only step; the link is only probed now and then, so the
        engine can tell when splitting pays again."""
        while (frame := (yield from self._receive(wait=False))) is not None:
            yield from self._apply(frame)
        if self.controller is not None:  # nobody reads the link estimates otherwise
            yield from self._maybe_probe()
        result = yield from self._compute(self.pipeline.local_step, x, y, epoch=epoch)
        yield from self._applied(result, self._last.busy_s, self._last.cpu_s, adapt=True)

    def _applied(self, result: StepResult, busy_s: float, cpu_s: float, *, adapt: bool) -> Steps[None]:
        """Book-keeping of one applied step, split or alone: timing, means, progress, decisions."""
        now = yield from self._now()
        if self.step_times and not self._interval_reset:
            self.tracker.observe_step_interval(1e3 * (now - self.step_times[-1]))
        self._interval_reset = False
        self.step_times.append(now)
        # this thread's CPU time is the step's compute only without intra-op threads
        cpu_ms = 1e3 * cpu_s if torch.get_num_threads() == 1 else None
        self.tracker.observe_edge_step(1e3 * busy_s, cpu_ms=cpu_ms)
        self._means.add(result, split=not self.pipeline.device_only)
        key = str(self.choice)
        self.steps_by_choice[key] = self.steps_by_choice.get(key, 0) + 1
        if self.progress is not None:
            elapsed = now - self._t_train
            self.progress(
                ProgressEvent(
                    epoch=self._epoch,
                    step=result.step,
                    loss=self._means.loss,
                    accuracy=self._means.accuracy,
                    steps_per_s=self.pipeline.steps_applied / elapsed if elapsed > 0 else 0.0,
                    result=result,
                )
            )
        if adapt:
            yield from self._maybe_adapt(now)

    def drain(self, *, adapt: bool = True) -> Steps[None]:
        """Apply gradients until nothing is in flight."""
        while self.pipeline.in_flight:
            yield from self._apply((yield from self._receive()), adapt=adapt)

    # ------------------------------------------------------------- context
    def _observe_gradients(self, frame: fr.Gradients) -> None:
        sent = self._sent.pop(frame.step, None)
        peer_sent, recv, recv_bytes = self._last_recv
        if sent is not None and self.link_change.observe((recv - sent.sent_ns) / 1e9):
            self._link_changed(frame.step)
        if sent is not None and frame.features_recv_ns:
            self.tracker.observe_uplink(sent.sent_ns, frame.features_recv_ns, sent.nbytes)
            if self.shared_clock:
                self.one_way_ms["up"].append((frame.features_recv_ns - sent.sent_ns) / 1e6)
        self.tracker.observe_downlink(peer_sent, recv, recv_bytes)
        if self.shared_clock:
            self.one_way_ms["down"].append((recv - peer_sent) / 1e6)
        self.tracker.observe_cloud_step(frame.cloud_ms)
        self.tracker.observe_queue_depth(frame.queue_depth)

    def _link_changed(self, step: int) -> None:
        """The link is not the one measured: forget it, re-decide soon."""
        self.tracker.uplink.reset()
        self.tracker.downlink.reset()
        self.tracker.reset_step_interval()  # its samples since the change: the new link's
        self.link_changes.append(step)
        if self.controller is not None:
            self.controller.force(self.pipeline.steps_applied)

    def _observe_context(self, frame: fr.Context) -> None:
        peer_sent, recv, recv_bytes = self._last_recv
        self.tracker.observe_downlink(peer_sent, recv, recv_bytes)
        waiting = self._context_requests.get(frame.step)
        asked = waiting.popleft() if waiting else None
        if waiting is not None and not waiting:
            del self._context_requests[frame.step]
        if asked is not None and frame.recv_ns:
            sent_ns, sent_bytes, padded = asked
            hold_ns = max(0, peer_sent - frame.recv_ns)
            self.tracker.observe_rtt(sent_ns, recv, remote_hold_ns=hold_ns)
            self.tracker.observe_uplink(sent_ns, frame.recv_ns, sent_bytes)
            if padded and self.probe_change.observe((recv - sent_ns - hold_ns) / 1e9):
                self._link_changed(frame.step)
        point = self.pipeline.point
        self.tracker.observe_remote(
            cloud_step_ms=frame.cloud_step_ms or None,
            cloud_block_ms={point + i: v for i, v in enumerate(frame.cloud_block_ms)},
            queue_depth=frame.queue_depth,
        )

    def probe_rtt(self, count: int = 3, *, bandwidth: bool = False) -> Steps[None]:
        """Round trips of small frames on an idle link (after the handshake, after a
        drain), one at a time: in-band requests sent while training queue behind
        features, so they measure queueing too; the RTT estimator keeps the minimum.
        ``bandwidth``: every other request padded, so the bandwidth fit sees two sizes."""
        for i in range(count):
            yield from self._probe_once(padded=bandwidth and i % 2 == 1)

    def _probe_once(self, *, padded: bool) -> Steps[None]:
        answered = False
        while not answered:
            resumes = self.resumes
            yield from self._request_context(padding=self._probe_bytes() if padded else 0)
            while not answered and self.resumes == resumes:  # a resume lost the request: ask again
                frame = yield from self._receive()
                if isinstance(frame, fr.Context):
                    self._observe_context(frame)
                    answered = bool(frame.recv_ns)

    def _initial_decision(self) -> Steps[None]:
        """Probe the link's bandwidth both ways (`INITIAL_PROBES`, until the choice
        is settled or `INITIAL_PROBE_BUDGET_S` is spent), then let the engine pick
        the start configuration (device-only included) before the first step."""
        assert self.controller is not None
        least, most = INITIAL_PROBES
        t0 = yield from self._now()
        for i in range(most):
            yield from self._probe_once(padded=i % 2 == 0)
            if i + 1 < least:
                continue
            if (yield from self._now()) - t0 >= INITIAL_PROBE_BUDGET_S:
                break
            # the check prices a few dozen candidates (~13 ms here): every third probe
            if (i + 1 - least) % 3 == 0 and self.controller.initial_settled(self.tracker.snapshot()):
                break
        now = yield from self._now()
        decision = self.controller.initial(self.tracker.snapshot(), now)
        if decision is not None:
            log.info("start: %s", decision.reason)
            yield from self.switch(decision.choice)

    def _probe_bytes(self) -> int:
        """Filler for a bandwidth probe: ~20 ms of the estimated link, within bounds."""
        snap = self.tracker.snapshot()
        bps = min(snap.uplink_bps or 1e6, snap.downlink_bps or 1e6)
        return int(min(fr.MAX_PADDING, max(PROBE_MIN_BYTES, bps * 0.02 / 8)))

    def _request_context(self, padding: int = 0) -> Steps[None]:
        """Ask for the cloud's Context; ``padding`` > 0 makes it a bandwidth probe
        (that many filler bytes up, and asked for in the answer)."""
        step = self.pipeline.next_step
        frame = fr.Context(step=step, request=True, padding=padding, reply_padding=padding)
        sent = yield from self._send(frame)
        self._context_requests.setdefault(step, deque()).append((sent.sent_ns, sent.nbytes, padding > 0))

    def _maybe_probe(self) -> Steps[None]:
        """While the device trains alone, keep the link estimates alive: every
        ``PROBE_EVERY_S`` one small request (RTT, and the small point of the
        bandwidth fit) and, half a period later, one padded to ~20 ms of the
        estimated link. Apart, not back to back: a frame that arrives right
        behind another tells the estimators nothing about its own size."""
        now = yield from self._now()
        if self._alone_since is None:
            self._alone_since = now
        elif now - self._alone_since > self._cloud_ttl_s:
            log.info(
                "%.0f s alone: the cloud's compute figures are that old; pricing it from the profile again",
                now - self._alone_since,
            )
            self.tracker.forget_cloud_compute()
            self._alone_since, self._cloud_ttl_s = now, 2 * self._cloud_ttl_s
        if now - self._last_probe_s < PROBE_EVERY_S / 8:
            return  # checked first: a device-only step can take a few milliseconds
        # faster while an estimate is missing (a new link): the engine waits for it
        warming = min(self.tracker.uplink.count, self.tracker.downlink.count) < 8
        if now - self._last_probe_s < (PROBE_EVERY_S / 8 if warming else PROBE_EVERY_S / 2):
            return
        self._last_probe_s = now
        self._probes += 1
        if self._probes % 2:
            yield from self._request_context()
            return
        yield from self._request_context(padding=self._probe_bytes())

    # ------------------------------------------------------------ decisions
    def _maybe_adapt(self, now: float) -> Steps[None]:
        """Ask the engine, at run time ``now`` (the step's own reading), whether to switch."""
        step = self.pipeline.steps_applied
        if self.controller is None or not self.controller.due(step, now):
            return
        decision = self.controller.decide(step, self.tracker.snapshot(), now)
        if decision is not None:
            log.info("step %d, %.1f s: %s", step, now, decision.reason)
            yield from self.switch(decision.choice)

    def switch(self, choice: Choice) -> Steps[None]:
        """Act on a decision: drain if needed, move the cut, change codec or K."""
        cur = self.choice
        if choice == cur:
            return
        if not cur.needs_drain(choice):
            self.pipeline.window.staleness = choice.staleness  # the window just grows
        else:
            yield from self.drain(adapt=False)
            if choice.point != cur.point:
                yield from self._repartition(choice)
                self.tracker.reset_compute()  # other blocks per step on each side now
                if self.pipeline.device_only and self.pipeline.steps_applied > 0:
                    # From now on only probes cross the link. The estimators' windows
                    # count frames, so the split's frames (and the migration's) would
                    # speak for the link long after it changed: start from the probes.
                    # (At start-up only probes have crossed: keep what they measured.)
                    self.tracker.uplink.reset()
                    self.tracker.downlink.reset()
            else:
                self.pipeline.codec = Codec.parse(choice.codec)
                self.pipeline.window.staleness = choice.staleness
        self.choice = choice
        self._alone_since = None  # (alone: counted from the first step trained alone)
        self.tracker.reset_step_interval()  # a new configuration, a new step time
        self._interval_reset = True
        if self.controller is not None:
            self.controller.current = choice
            self.controller.switched(self.pipeline.steps_applied)

    def _repartition(self, choice: Choice) -> Steps[list[fr.Weights]]:
        """The repartition exchange (`edge_sdk.repartition`); returns the weights that came down.
        Not resumable: a drop mid-way leaves it unknown whether the cloud moved the cut."""
        resumable, self._resumable = self._resumable, False
        try:
            return (yield from self._exchange_repartition(choice))
        finally:
            self._resumable = resumable

    def _exchange_repartition(self, choice: Choice) -> Steps[list[fr.Weights]]:
        model = self.setup.spec.model
        self.sync_head_to_model()
        for request in repartition.request_frames(
            self.pipeline, model, choice.point, codec=choice.codec, staleness=choice.staleness
        ):
            yield from self._send(request)
        received: list[fr.Weights] = []
        while True:
            frame = yield from self._receive()
            if isinstance(frame, fr.Weights):
                received.append(frame)
            elif isinstance(frame, fr.RepartitionAck):
                ack = frame
                break
            elif isinstance(frame, fr.Context):
                self._observe_context(frame)
        yield from self._compute(
            repartition.complete,
            self.pipeline,
            model,
            ack,
            received,
            self.make_runtime,
            codec=choice.codec,
            staleness=choice.staleness,
            train=False,
            scaled=False,
        )
        self.runtime = self.pipeline.runtime
        self.last_migration = received
        return received

    def evaluate(self, epoch: int) -> Steps[fr.EvalResult]:
        if self.pipeline.device_only:  # the whole model is here: nothing crosses the link
            loss, correct, count = 0.0, 0, 0
            for x, y in self.setup.test_loader(self.cfg):
                batch_loss, batch_correct, n = yield from self._compute(self.pipeline.local_eval, x, y, train=False)
                loss, correct, count = loss + batch_loss, correct + batch_correct, count + n
            return fr.EvalResult(epoch=epoch, loss=loss / count if count else 0.0, correct=correct, count=count)
        while True:  # once, or again after a resume: the cloud keeps one result per batch
            resumes = self.resumes
            for i, (x, y) in enumerate(self.setup.test_loader(self.cfg)):
                feats = yield from self._compute(self.pipeline.eval_features, x, y, epoch=epoch, batch=i, train=False)
                yield from self._send(feats)
            yield from self._send(fr.EpochEnd(epoch=epoch, step=self.pipeline.next_step, train=False))
            while self.resumes == resumes:
                frame = yield from self._receive()
                if isinstance(frame, fr.EvalResult):
                    return frame

    # ------------------------------------------------------------- the run
    def _train(self, result: TrainResult, start: DeviceCheckpoint | None = None) -> Steps[None]:
        """The epochs (from ``start``'s position when carrying on from a checkpoint)
        and, with ``--save-model``, bringing the model home. A cloud that restarts
        rolls both sides back to the newest checkpoint (`RolledBack`), and the
        epochs go on from there."""
        self._t_train = yield from self._now()
        self._t_epoch = self._t_train
        self._all_means = RunningMeans()
        if start is None:
            # step 0: a cloud that restarts before the first epoch ends has something to go back to
            yield from self._checkpoint(0, 0)
        position = (start.epoch, start.batch) if start is not None else (0, 0)
        while True:
            try:
                yield from self._epochs(result, *position)
                self.trained_choice = self.choice  # what trained (collecting the model moves the cut)
                if self.cfg.save_model:
                    yield from self.collect_model()
                break
            except RolledBack as back:
                result.train_s += (yield from self._now()) - self._t_epoch
                self._roll_back(back.checkpoint)
                position = (back.checkpoint.epoch, back.checkpoint.batch)
        steps = self.pipeline.steps_applied
        all_means = self._all_means
        cloud = sum(all_means.cloud_ms) / len(all_means.cloud_ms) if all_means.cloud_ms else 0.0
        rtt = statistics.median_high(all_means.rtt_ms) if all_means.rtt_ms else 0.0
        result.stage_ms = {"edge": 1e3 * self.edge_busy_s / steps if steps else 0.0, "cloud": cloud}
        if self.one_way_ms["up"]:
            # medians: one-way time per frame including any queueing behind earlier frames
            result.stage_ms["up"] = statistics.median_high(self.one_way_ms["up"])
            result.stage_ms["down"] = statistics.median_high(self.one_way_ms["down"])
        result.stage_ms["round_trip"] = rtt

    def _epochs(self, result: TrainResult, first_epoch: int, first_batch: int) -> Steps[None]:
        """Epochs ``first_epoch``.. to the end, the first from batch ``first_batch``
        (the batch order is a function of seed and epoch, so a resumed epoch sees the
        batches the interrupted one would have)."""
        every = self.cfg.checkpoint_every
        for epoch in range(first_epoch, self.cfg.epochs):
            skip = first_batch if epoch == first_epoch else 0
            if not skip:
                self._means = RunningMeans()  # (a resumed epoch goes on with its checkpoint's means)
            self._interval_reset = True  # evaluation and the epoch's drain are not a step
            self._t_epoch = t_epoch = yield from self._now()
            for i, (x, y) in enumerate(self.setup.train_loader(self.cfg, epoch)):
                if i < skip:
                    continue
                if self.stop_reason is not None:
                    yield from self._stop_here(epoch, i)
                if self.cfg.max_steps_per_epoch is not None and i >= self.cfg.max_steps_per_epoch:
                    break
                if self.cfg.max_train_s is not None:
                    now = yield from self._now()
                    if result.train_s + now - t_epoch > self.cfg.max_train_s:
                        result.stopped_early = True
                        break
                if every and i > skip and self.pipeline.next_step - self._checkpoint_asked >= every:
                    yield from self._checkpoint(epoch, i)
                yield from self.train_batch(x, y, epoch)
            yield from self.drain()
            result.train_s += (yield from self._now()) - t_epoch
            self._t_epoch = yield from self._now()
            if result.stopped_early:
                break  # a partial epoch: no evaluation, no record
            yield from self.probe_rtt(1)
            yield from self._send(fr.EpochEnd(epoch=epoch, step=self.pipeline.next_step, train=True))
            if self.cfg.evaluate:
                ev = yield from self.evaluate(epoch)
            else:
                ev = fr.EvalResult(epoch=epoch, loss=float("nan"), correct=0, count=0)
            wall = yield from self._now()  # the time base of step_times and decisions
            means = self._means
            test_acc = ev.correct / ev.count if ev.count else float("nan")
            result.history.append(
                dict(
                    epoch=epoch,
                    train_loss=means.loss,
                    train_accuracy=means.accuracy,
                    test_loss=ev.loss,
                    test_accuracy=test_acc,
                    wall_s=wall,
                    train_s=result.train_s,
                    steps=self.pipeline.steps_applied,
                )
            )
            if self.on_epoch is not None:
                self.on_epoch(result.history[-1])
            result.timeline.append(dict(wall_s=wall, train_loss=means.loss, test_accuracy=test_acc))
            result.train_loss, result.train_accuracy = means.loss, means.accuracy
            result.test_loss, result.test_accuracy = ev.loss, test_acc
            self._all_means.cloud_ms += means.cloud_ms
            self._all_means.rtt_ms += means.rtt_ms
            yield from self._checkpoint(epoch + 1, 0)
            self._t_epoch = yield from self._now()
            if self.stop_reason is not None and epoch + 1 < self.cfg.epochs:
                yield from self._stop_here(epoch + 1, 0)

    def run(self, t_start: float, *, network: str = "none") -> Steps[TrainResult]:
        """The whole run on a connected link: handshake (or, carrying on from a
        checkpoint, the resume), probes, the engine's start-up decision, the
        epochs, Bye. ``t_start`` is the transport's clock when the run began
        (before connecting): the time base of every record."""
        cfg = self.cfg
        self._t_run = t_start
        result = TrainResult(
            point=self.choice.point,
            codec=self.choice.codec,
            staleness=self.choice.staleness,
            network=network,
            device_slowdown=cfg.device_slowdown,
            model=cfg.model,
            dataset=cfg.dataset,
            runtime=self.runtime.name,
            error_feedback=cfg.error_feedback,
            defence=cfg.cut_defence.label,
            privacy_floor=cfg.privacy_floor,
        )
        self.result = result
        start = self.resume_from
        if start is None:
            yield from self.handshake()
        else:
            yield from self._restart(start, result)
        self._resumable = self.cfg.reconnect_timeout_s > 0
        try:
            yield from self.probe_rtt()
        except RolledBack as back:  # the cloud restarted this early: nothing trained since the checkpoint
            self._roll_back(back.checkpoint)
        if self.controller is not None and start is None:
            yield from self._initial_decision()
        result.startup_s = yield from self._now()
        yield from self._train(result, start)
        trained = self.trained_choice
        self.sync_head_to_model()
        self._resumable = False
        yield from self._send(fr.Bye(reason="training finished"))
        result.wall_s = yield from self._now()
        self._report(result)
        result.point, result.codec, result.staleness = trained.point, trained.codec, trained.staleness
        return result

    def _restart(self, checkpoint: DeviceCheckpoint, result: TrainResult) -> Steps[None]:
        """Carry on a run whose device process died: take its checkpoint's state and
        records, and re-attach to its session; the cloud rolls back to the same step."""
        m = checkpoint.manifest
        self.session_id = int(m["session"])
        self.resume_token = str(m["resume_token"])
        self.checkpoint = checkpoint
        self.checkpoint_stats["step"] = self._checkpoint_asked = checkpoint.step
        self._roll_back(checkpoint)
        result.train_s = float(m["train_s"])
        ack = yield from self._resume_hello("carrying on from the checkpoint", restart=True)
        if isinstance(ack, Closed):
            raise TrainingError(f"cannot resume the run: {ack.reason}")
        self.rollbacks.append(dict(from_step=None, to_step=checkpoint.step, reason="the device restarted (--resume)"))
        log.info("resumed session %d from the checkpoint of step %d", self.session_id, checkpoint.step)

    def collect_model(self) -> Steps[None]:
        """Bring every block and its optimizer state to the device (the repartition
        to device-only), so the whole trained model is here to be saved."""
        L = self.setup.spec.model.num_blocks
        if self.pipeline.point != L:
            yield from self.switch(Choice(L, "fp32", 0))
        self.sync_head_to_model()

    def partial_result(self, now_s: float, reason: str) -> TrainResult:
        """The report of a run stopped from outside (Ctrl-C, SIGTERM) at transport
        time ``now_s``: the epochs finished so far, the steps applied, why it stopped."""
        result = self.result or TrainResult(model=self.cfg.model, dataset=self.cfg.dataset)
        self._report(result)
        result.wall_s = now_s - self._t_run if self.result is not None else 0.0
        result.interrupted = reason
        return result

    def _report(self, result: TrainResult) -> None:
        """The run's figures that the session holds (the transport adds its byte counts)."""
        result.steps = self.pipeline.steps_applied
        result.epochs = self.cfg.epochs
        result.point, result.codec, result.staleness = self.choice.point, self.choice.codec, self.choice.staleness
        if self.controller is not None:
            result.partition_history = self.controller.history
        else:
            result.partition_history = [
                dict(
                    step=0,
                    point=self.choice.point,
                    codec=self.choice.codec,
                    staleness=self.choice.staleness,
                    predicted_step_ms=None,
                    switch=False,
                    reason="fixed by the user",
                )
            ]
        result.context = self.tracker.snapshot().to_dict()
        result.step_times = self.step_times
        result.steps_by_choice = dict(self.steps_by_choice)
        result.reconnects = list(self.reconnects)
        result.rollbacks = list(self.rollbacks)
        result.checkpoints = dict(self.checkpoint_stats, directory=self.cfg.checkpoint_dir)
        result.num_blocks = self.setup.spec.model.num_blocks
        if self.controller is not None:
            result.device_only_estimate = self.controller.device_only_estimate(self.tracker.snapshot(), result.steps)
