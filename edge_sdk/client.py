"""The device's WebSocket client: drives an `EdgePipeline` over a real link.

The protocol rules live in `edge_sdk.pipeline` (sans-I/O). This module only
schedules work and moves bytes:

* a reader task decodes incoming frames into an inbox,
* a writer task sends queued frames, so uploading step *i* overlaps computing
  step *i+1* (sending a 4 MiB frame through a slow link must not stall compute),
* head compute runs in a worker thread so the event loop keeps the socket busy,
* the device slowdown is emulated by *sleeping* ``(s - 1) x`` the measured compute
  after each compute, so a slow device costs wall time, not this machine's cores.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from edge_sdk import repartition
from edge_sdk.context import ContextTracker, LinkChangeDetector
from edge_sdk.decision.setup import build_controller, initial_choice
from edge_sdk.hello import hello_frame
from edge_sdk.pipeline import EdgePipeline, StepResult
from edge_sdk.runtime import EagerRuntime, HeadRuntime, load_runtime
from edge_sdk.training import LocalSetup, TrainConfig, TrainResult, build_local
from schemas import frames as fr
from schemas.codecs import Codec
from schemas.errors import WireError
from schemas.transport import clear_text_token_warning

log = logging.getLogger("edge_sdk")

MAX_FRAME_BYTES = 64 * 1024 * 1024
#: while training alone, probe the link this often (s), with at least this many filler bytes
PROBE_EVERY_S = 2.0
PROBE_MIN_BYTES = 2048
#: probes (small and padded alternating) before the engine's start-up decision
INITIAL_PROBES = 14


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is meant for the user as is."""


@dataclass
class _Closed:
    reason: str


@dataclass
class LinkCounters:
    bytes_up: int = 0
    bytes_down: int = 0
    frames_up: int = 0
    frames_down: int = 0


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
class _RunningMeans:
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


class EdgeClient:
    """One training run of one device against one cloud backend."""

    def __init__(
        self,
        url: str,
        cfg: TrainConfig,
        *,
        setup: LocalSetup | None = None,
        progress: Callable[[ProgressEvent], None] | None = None,
        network: str = "none",
        shared_clock: bool = False,
    ) -> None:
        self.url = url
        self.cfg = cfg
        self.setup = setup or build_local(cfg)
        self.progress = progress
        self.network = network
        self.counters = LinkCounters()
        self._inbox: asyncio.Queue[tuple[fr.Envelope, int, int] | _Closed] = asyncio.Queue()
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._seq = 0
        self.session = 0
        self.choice = initial_choice(cfg, self.setup)
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
            num_blocks=self.setup.spec.model.num_blocks,
            loss_fn=self.setup.spec.loss,
        )
        self.edge_busy_s = 0.0  # device time including emulated slowdown
        self._last_compute_s = 0.0
        self._last_cpu_s = 0.0
        self.step_times: list[float] = []  # seconds since the run started, per applied step
        self._t_run = time.perf_counter()
        # In emulation both ends read the same monotonic clock, so one-way delays
        # are directly measurable; on a real link only their differences are.
        self.shared_clock = shared_clock
        self._sent_ns: dict[int, int] = {}
        self._last_recv: tuple[int, int, int] = (0, 0, 0)  # (peer sent_ns, our recv_ns, bytes) of the last frame
        self.one_way_ms: dict[str, list[float]] = {"up": [], "down": []}
        # context measurement and the decision engine
        self.tracker = ContextTracker()
        self.link_change = LinkChangeDetector()
        #: the same for the padded probes while the device trains alone, both ways
        self.probe_change = LinkChangeDetector(window=8, warmup=3, min_jump_s=0.05, faster=True)
        self.link_changes: list[int] = []  # steps at which the link was seen to change
        self.controller = build_controller(cfg, self.setup, self.choice)
        self._sent_bytes: dict[int, int] = {}
        self._step_compute_s: dict[int, tuple[float, float]] = {}  # step -> (busy, cpu) of its forward
        #: step -> (sent_ns, bytes, padded) of the Context requests waiting for an answer, in order
        self._context_requests: dict[int, deque[tuple[int, int, bool]]] = {}
        self._last_probe_s = -math.inf
        self._interval_reset = False  # the next interval spans a switch: not a step time
        self._probes = 0
        self.repartitions = 0
        #: applied steps per configuration ("p=2 int8 K=4": n), for the summary
        self.steps_by_choice: dict[str, int] = {}

    def make_runtime(self, point: int) -> HeadRuntime:
        model = self.setup.spec.model
        if self.cfg.runtime == "eager":
            return EagerRuntime(model.head(point), name_map=model.head_name_map(point))
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

    # ------------------------------------------------------------- transport
    def _envelope(self, frame: object) -> bytes:
        env = fr.Envelope(frame=frame, session=self.session, seq=self._seq, sent_ns=time.monotonic_ns())
        self._seq += 1
        return fr.encode(env)

    async def _send(self, frame: object) -> int:
        data = self._envelope(frame)
        await self._outbox.put(data)
        return len(data)

    async def _reader(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, str):
                    continue
                self.counters.bytes_down += len(message)
                self.counters.frames_down += 1
                recv_ns = time.monotonic_ns()
                try:
                    await self._inbox.put((fr.decode(message), recv_ns, len(message)))
                except WireError as exc:
                    await self._inbox.put(_Closed(f"cloud sent a malformed frame: {exc}"))
                    return
            await self._inbox.put(
                _Closed(f"cloud closed the connection (code {ws.close_code}{': ' + ws.close_reason if ws.close_reason else ''})")
            )
        except ConnectionClosed as exc:
            await self._inbox.put(_Closed(f"connection to the cloud was lost ({exc})"))

    async def _writer(self, ws: ClientConnection) -> None:
        try:
            while (data := await self._outbox.get()) is not None:
                await ws.send(data)
                self.counters.bytes_up += len(data)
                self.counters.frames_up += 1
        except ConnectionClosed as exc:
            await self._inbox.put(_Closed(f"connection to the cloud was lost while sending ({exc})"))

    async def _next_frame(self) -> object:
        item = await self._inbox.get()
        if isinstance(item, _Closed):
            await self._inbox.put(item)  # every later wait sees it too
            raise TrainingError(item.reason)
        envelope, recv_ns, nbytes = item
        self._last_recv = (envelope.sent_ns, recv_ns, nbytes)
        frame = envelope.frame
        if isinstance(frame, fr.Error):
            raise TrainingError(f"cloud refused: {frame.message} ({frame.code.name})")
        return frame

    async def _compute(self, fn: Callable, *args, train: bool = True, **kwargs):
        """Run head compute off the event loop, then emulate a slower device."""
        t0 = time.perf_counter()
        out, cpu_s = await asyncio.to_thread(_timed_on_cpu, fn, *args, **kwargs)
        if self.cfg.device_slowdown > 1.0:
            # (s-1) x the compute's *CPU* time: waiting for this machine's busy cores
            # (cloud and proxy share them in emulation) must not be amplified s-fold.
            await asyncio.sleep((self.cfg.device_slowdown - 1.0) * cpu_s)
        # The device is occupied for the whole span, thread hand-offs and timer
        # slack included: that, not the kernel time alone, is what limits the pipeline.
        busy = time.perf_counter() - t0
        if train:
            self.edge_busy_s += busy
        self._last_compute_s = busy
        self._last_cpu_s = cpu_s
        return out

    # --------------------------------------------------------------- protocol
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

    async def _handshake(self) -> None:
        await self._send(self.hello())
        frame = await self._next_frame()
        if not isinstance(frame, fr.HelloAck) or not frame.accepted:
            raise TrainingError(f"cloud did not accept the session: {getattr(frame, 'message', type(frame).__name__)}")
        self.session = frame.session

    async def _apply(
        self, frame: object, means: _RunningMeans, epoch: int, t_start: float, *, adapt: bool = True
    ) -> StepResult | None:
        if isinstance(frame, fr.Context):
            self._observe_context(frame)
            return None
        if isinstance(frame, fr.Gradients):
            self._observe_gradients(frame)
            result = await self._compute(self.pipeline.on_gradients, frame)
            busy_s, cpu_s = self._step_compute_s.pop(result.step, (0.0, 0.0))
            await self._applied(result, busy_s + self._last_compute_s, cpu_s + self._last_cpu_s, means, epoch, t_start, adapt)
            return result
        return None  # Context and other informational frames

    async def _train_alone(self, x: torch.Tensor, y: torch.Tensor, means: _RunningMeans, epoch: int, t_start: float) -> None:
        """One device-only step; the link is only probed now and then, so the
        engine can tell when splitting pays again."""
        while not self._inbox.empty():
            await self._apply(await self._next_frame(), means, epoch, t_start)
        if self.controller is not None:  # nobody reads the link estimates otherwise
            await self._maybe_probe()
        result = await self._compute(self.pipeline.local_step, x, y, epoch=epoch)
        await self._applied(result, self._last_compute_s, self._last_cpu_s, means, epoch, t_start, True)

    async def _applied(
        self, result: StepResult, busy_s: float, cpu_s: float, means: _RunningMeans, epoch: int, t_start: float, adapt: bool
    ) -> None:
        """Book-keeping of one applied step, split or alone: timing, means, progress, decisions."""
        now = time.perf_counter() - self._t_run
        if self.step_times and not self._interval_reset:
            self.tracker.observe_step_interval(1e3 * (now - self.step_times[-1]))
        self._interval_reset = False
        self.step_times.append(now)
        # this thread's CPU time is the step's compute only without intra-op threads
        cpu_ms = 1e3 * cpu_s if torch.get_num_threads() == 1 else None
        self.tracker.observe_edge_step(1e3 * busy_s, cpu_ms=cpu_ms)
        means.add(result, split=not self.pipeline.device_only)
        key = str(self.choice)
        self.steps_by_choice[key] = self.steps_by_choice.get(key, 0) + 1
        if self.progress is not None:
            elapsed = time.perf_counter() - t_start
            self.progress(
                ProgressEvent(
                    epoch=epoch,
                    step=result.step,
                    loss=means.loss,
                    accuracy=means.accuracy,
                    steps_per_s=self.pipeline.stats.steps_applied / elapsed if elapsed > 0 else 0.0,
                    result=result,
                )
            )
        if adapt:
            await self._maybe_adapt(means, epoch, t_start)

    # ---------------------------------------------------------------- context
    def _observe_gradients(self, frame: fr.Gradients) -> None:
        sent = self._sent_ns.pop(frame.step, None)
        nbytes = self._sent_bytes.pop(frame.step, 0)
        peer_sent, recv, recv_bytes = self._last_recv
        if sent is not None and self.link_change.observe((recv - sent) / 1e9):
            self._link_changed(frame.step)
        if sent is not None and frame.features_recv_ns:
            self.tracker.observe_uplink(sent, frame.features_recv_ns, nbytes)
            if self.shared_clock:
                self.one_way_ms["up"].append((frame.features_recv_ns - sent) / 1e6)
        self.tracker.observe_downlink(peer_sent, recv, recv_bytes)
        if self.shared_clock:
            self.one_way_ms["down"].append((recv - peer_sent) / 1e6)
        self.tracker.observe_cloud_step(frame.cloud_ms)
        self.tracker.observe_queue_depth(frame.queue_depth)

    def _link_changed(self, step: int) -> None:
        """The link is not the one measured: forget it, re-decide soon."""
        self.tracker.uplink.reset()
        self.tracker.downlink.reset()
        self.link_changes.append(step)
        if self.controller is not None:
            self.controller.force(self.pipeline.stats.steps_applied)

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

    async def _probe_rtt(self, count: int = 3, *, bandwidth: bool = False) -> None:
        """Round trips of small frames on an idle link (after the handshake, after a
        drain), one at a time: in-band requests sent while training queue behind
        features, so they measure queueing too; the RTT estimator keeps the minimum.
        ``bandwidth``: every other request padded, so the bandwidth fit sees two sizes."""
        for i in range(count):
            await self._request_context(padding=self._probe_bytes() if bandwidth and i % 2 else 0)
            while True:
                frame = await self._next_frame()
                if isinstance(frame, fr.Context):
                    self._observe_context(frame)
                    if frame.recv_ns:
                        break

    async def _initial_decision(self) -> None:
        """Probe the link's bandwidth both ways, then let the engine pick the start
        configuration (device-only included) before the first step."""
        assert self.controller is not None
        await self._probe_rtt(INITIAL_PROBES, bandwidth=True)
        now = time.perf_counter() - self._t_run
        decision = self.controller.initial(self.tracker.snapshot(), now)
        if decision is not None:
            log.info("start: %s", decision.reason)
            await self._switch(decision.choice, _RunningMeans(), 0, time.perf_counter())

    def _probe_bytes(self) -> int:
        """Filler for a bandwidth probe: ~20 ms of the estimated link, within bounds."""
        snap = self.tracker.snapshot()
        bps = min(snap.uplink_bps or 1e6, snap.downlink_bps or 1e6)
        return int(min(fr.MAX_PADDING, max(PROBE_MIN_BYTES, bps * 0.02 / 8)))

    async def _request_context(self, padding: int = 0) -> None:
        """Ask for the cloud's Context; ``padding`` > 0 makes it a bandwidth probe
        (that many filler bytes up, and asked for in the answer)."""
        step = self.pipeline.next_step
        frame = fr.Context(step=step, request=True, padding=padding, reply_padding=padding)
        nbytes = await self._send(frame)
        self._context_requests.setdefault(step, deque()).append((time.monotonic_ns(), nbytes, padding > 0))

    async def _maybe_probe(self) -> None:
        """While the device trains alone, keep the link estimates alive: every
        ``PROBE_EVERY_S`` one small request (RTT, and the small point of the
        bandwidth fit) and, half a period later, one padded to ~20 ms of the
        estimated link. Apart, not back to back: a frame that arrives right
        behind another tells the estimators nothing about its own size."""
        now = time.perf_counter()
        if now - self._last_probe_s < PROBE_EVERY_S / 8:
            return  # checked first: a device-only step can take a few milliseconds
        # faster while an estimate is missing (a new link): the engine waits for it
        warming = min(self.tracker.uplink.count, self.tracker.downlink.count) < 8
        if now - self._last_probe_s < (PROBE_EVERY_S / 8 if warming else PROBE_EVERY_S / 2):
            return
        self._last_probe_s = now
        self._probes += 1
        if self._probes % 2:
            await self._request_context()
            return
        await self._request_context(padding=self._probe_bytes())

    # --------------------------------------------------------------- decisions
    async def _maybe_adapt(self, means: _RunningMeans, epoch: int, t_start: float) -> None:
        step = self.pipeline.stats.steps_applied
        now = time.perf_counter() - self._t_run
        if self.controller is None or not self.controller.due(step, now):
            return
        decision = self.controller.decide(step, self.tracker.snapshot(), now)
        if decision is not None:
            log.info("step %d, %.1f s: %s", step, now, decision.reason)
            await self._switch(decision.choice, means, epoch, t_start)

    async def _switch(self, choice, means: _RunningMeans, epoch: int, t_start: float) -> None:
        """Act on a decision: drain if needed, move the cut, change codec or K."""
        cur = self.choice
        if choice == cur:
            return
        if choice.point == cur.point and choice.codec == cur.codec and choice.staleness >= cur.staleness:
            self.pipeline.window.staleness = choice.staleness  # growing the window needs no drain
        else:
            await self._drain(means, epoch, t_start, adapt=False)
            if choice.point != cur.point:
                await self._repartition(choice)
                self.tracker.reset_compute()  # other blocks per step on each side now
                if self.pipeline.device_only:
                    # From now on only probes cross the link. The estimators' windows
                    # count frames, so the split's frames (and the migration's) would
                    # speak for the link long after it changed: start from the probes.
                    self.tracker.uplink.reset()
                    self.tracker.downlink.reset()
            else:
                self.pipeline.codec = Codec.parse(choice.codec)
                self.pipeline.window.staleness = choice.staleness
        self.choice = choice
        self.tracker.reset_step_interval()  # a new configuration, a new step time
        self._interval_reset = True
        if self.controller is not None:
            self.controller.current = choice
            self.controller.switched(self.pipeline.stats.steps_applied)

    async def _repartition(self, choice) -> None:
        model = self.setup.spec.model
        self.sync_head_to_model()
        for frame in repartition.request_frames(
            self.pipeline, model, choice.point, codec=choice.codec, staleness=choice.staleness
        ):
            await self._send(frame)
        received: list[fr.Weights] = []
        while True:
            frame = await self._next_frame()
            if isinstance(frame, fr.Weights):
                received.append(frame)
            elif isinstance(frame, fr.RepartitionAck):
                break
            elif isinstance(frame, fr.Context):
                self._observe_context(frame)
        await asyncio.to_thread(
            repartition.complete,
            self.pipeline,
            model,
            frame,
            received,
            self.make_runtime,
            codec=choice.codec,
            staleness=choice.staleness,
        )
        self.runtime = self.pipeline.runtime
        self.repartitions += 1

    async def _drain(self, means: _RunningMeans, epoch: int, t_start: float, *, adapt: bool = True) -> None:
        while self.pipeline.in_flight:
            await self._apply(await self._next_frame(), means, epoch, t_start, adapt=adapt)

    async def _evaluate(self, epoch: int) -> fr.EvalResult:
        if self.pipeline.device_only:  # the whole model is here: nothing crosses the link
            loss, correct, count = 0.0, 0, 0
            for x, y in self.setup.test_loader(self.cfg):
                batch_loss, batch_correct, n = await self._compute(self.pipeline.local_eval, x, y, train=False)
                loss, correct, count = loss + batch_loss, correct + batch_correct, count + n
            return fr.EvalResult(epoch=epoch, loss=loss / count if count else 0.0, correct=correct, count=count)
        for i, (x, y) in enumerate(self.setup.test_loader(self.cfg)):
            feats = await self._compute(self.pipeline.eval_features, x, y, epoch=epoch, batch=i, train=False)
            await self._send(feats)
        await self._send(fr.EpochEnd(epoch=epoch, step=self.pipeline.next_step, train=False))
        while True:
            frame = await self._next_frame()
            if isinstance(frame, fr.EvalResult):
                return frame

    async def _train(self, result: TrainResult) -> None:
        t_start = time.perf_counter()
        all_means = _RunningMeans()
        for epoch in range(self.cfg.epochs):
            means = _RunningMeans()
            self._interval_reset = True  # evaluation and the epoch's drain are not a step
            t_epoch = time.perf_counter()
            for i, (x, y) in enumerate(self.setup.train_loader(self.cfg, epoch)):
                if self.cfg.max_steps_per_epoch is not None and i >= self.cfg.max_steps_per_epoch:
                    break
                if self.cfg.max_train_s is not None and result.train_s + time.perf_counter() - t_epoch > self.cfg.max_train_s:
                    result.stopped_early = True
                    break
                # One frame that already arrived, then a new step as soon as the window
                # has room. Applying *every* waiting gradient first lets the window run
                # dry: steps then travel in convoys of K+1 and the device idles while
                # the first of each convoy makes its round trip (measured: 46 vs 39
                # ms/step on wifi at p=1 K=2), which is the latency replay should hide.
                if not self.pipeline.device_only and not self._inbox.empty():
                    await self._apply(await self._next_frame(), means, epoch, t_start)
                while not self.pipeline.device_only and not self.pipeline.can_start():
                    await self._apply(await self._next_frame(), means, epoch, t_start)
                if self.pipeline.device_only:  # from the start, or a decision just now
                    await self._train_alone(x, y, means, epoch, t_start)
                    continue
                if self.pipeline.next_step % self.cfg.decide_every == 0:
                    await self._request_context()
                feats = await self._compute(self.pipeline.start_step, x, y, epoch=epoch)
                self._step_compute_s[feats.step] = (self._last_compute_s, self._last_cpu_s)
                self._sent_ns[feats.step] = time.monotonic_ns()
                self._sent_bytes[feats.step] = await self._send(feats)
            await self._drain(means, epoch, t_start)
            result.train_s += time.perf_counter() - t_epoch
            if result.stopped_early:
                break  # a partial epoch: no evaluation, no record
            await self._probe_rtt(1)
            await self._send(fr.EpochEnd(epoch=epoch, step=self.pipeline.next_step, train=True))
            if self.cfg.evaluate:
                ev = await self._evaluate(epoch)
            else:
                ev = fr.EvalResult(epoch=epoch, loss=float("nan"), correct=0, count=0)
            wall = time.perf_counter() - self._t_run  # the time base of step_times and decisions
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
                    steps=self.pipeline.stats.steps_applied,
                )
            )
            result.timeline.append(dict(wall_s=wall, train_loss=means.loss, test_accuracy=test_acc))
            result.train_loss, result.train_accuracy = means.loss, means.accuracy
            result.test_loss, result.test_accuracy = ev.loss, test_acc
            all_means.cloud_ms += means.cloud_ms
            all_means.rtt_ms += means.rtt_ms
        steps = self.pipeline.stats.steps_applied
        cloud = sum(all_means.cloud_ms) / len(all_means.cloud_ms) if all_means.cloud_ms else 0.0
        rtt = _median(all_means.rtt_ms) if all_means.rtt_ms else 0.0
        result.stage_ms = {"edge": 1e3 * self.edge_busy_s / steps if steps else 0.0, "cloud": cloud}
        if self.one_way_ms["up"]:
            # medians: one-way time per frame including any queueing behind earlier frames
            result.stage_ms["up"] = _median(self.one_way_ms["up"])
            result.stage_ms["down"] = _median(self.one_way_ms["down"])
        result.stage_ms["round_trip"] = rtt

    async def run(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(
            point=self.choice.point,
            codec=self.choice.codec,
            staleness=self.choice.staleness,
            network=self.network,
            device_slowdown=cfg.device_slowdown,
            model=cfg.model,
            dataset=cfg.dataset,
            runtime=self.runtime.name,
            error_feedback=cfg.error_feedback,
        )
        t0 = self._t_run = time.perf_counter()
        if cfg.token and (warning := clear_text_token_warning(self.url)):
            log.warning("warning: %s", warning)
        tls = None
        if self.url.startswith("wss://"):
            try:
                tls = ssl.create_default_context(cafile=cfg.tls_ca)
            except (OSError, ssl.SSLError) as exc:
                raise TrainingError(f"cannot read the CA certificate {cfg.tls_ca}: {exc}") from None
        try:
            ws = await connect(
                self.url, compression=None, max_size=MAX_FRAME_BYTES, open_timeout=15, ping_interval=20, ping_timeout=60, ssl=tls
            )
        except (OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError) as exc:
            raise TrainingError(f"cannot connect to the cloud at {self.url}: {exc}") from None
        reader = asyncio.create_task(self._reader(ws))
        writer = asyncio.create_task(self._writer(ws))
        try:
            await self._handshake()
            await self._probe_rtt()
            if self.controller is not None:
                await self._initial_decision()
            result.startup_s = time.perf_counter() - t0
            await self._train(result)
            self.sync_head_to_model()
            await self._send(fr.Bye(reason="training finished"))
            await self._outbox.put(None)
            await writer
        finally:
            writer.cancel()
            await ws.close()
            reader.cancel()
        result.wall_s = time.perf_counter() - t0
        result.steps = self.pipeline.stats.steps_applied
        result.epochs = cfg.epochs
        result.bytes_up = self.counters.bytes_up
        result.bytes_down = self.counters.bytes_down
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
        result.num_blocks = self.setup.spec.model.num_blocks
        if self.controller is not None:
            result.device_only_estimate = self.controller.device_only_estimate(self.tracker.snapshot(), result.steps)
        return result


def _timed_on_cpu(fn: Callable, *args, **kwargs):
    """Run ``fn`` and return (result, CPU seconds this thread spent in it)."""
    c0 = time.thread_time()
    out = fn(*args, **kwargs)
    return out, time.thread_time() - c0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def run_training(url: str, cfg: TrainConfig, **kwargs) -> TrainResult:
    """Synchronous entry point (CLI, benchmarks)."""
    torch.manual_seed(cfg.seed)
    return asyncio.run(EdgeClient(url, cfg, **kwargs).run())
