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

import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

import torch

from cloud_backend.memory_budget import MemoryBudget
from cloud_backend.model_lock import MODEL_LOCK
from cloud_backend.validation import (
    REPLY_CACHE_SIZE,
    ModelPlan,
    WeightsPlan,
    check_features_claim,
    check_features_values,
    check_hello_fields,
    check_optimizer_entries,
    check_weights_values,
    eval_batch_limit,
    parse_grad_codec,
    parse_optimizer,
    reply_cache_bytes,
)
from edge_sdk import zoo
from edge_sdk.checkpoints import flatten_optimizer_state, split_state, unflatten_optimizer_state
from edge_sdk.context import ComputeEstimator
from edge_sdk.migration import (
    StateAssembler,
    block_index,
    check_complete,
    export_state,
    import_state,
    install_optimizer_state,
    named_tensors,
    optimizer_state_by_name,
    state_hash,
)
from edge_sdk.optim import OptimizerConfig, build_optimizer, set_lr
from schemas import codecs
from schemas.errors import ErrorCode, WireError
from schemas.frames import (
    MAX_PADDING,
    Bye,
    Checkpoint,
    CheckpointAck,
    Context,
    EpochEnd,
    Error,
    EvalResult,
    Features,
    Frame,
    Gradients,
    Hello,
    HelloAck,
    Repartition,
    RepartitionAck,
    Weights,
)

_BUDGET_KEYS = itertools.count(1)
log = logging.getLogger("cloud_backend")

_HEX64 = re.compile(r"[0-9a-f]{64}")

#: Default memory budget of one session (model, tail optimizer, reply cache, one
#: step's activations, migrating weights); ``serve --max-session-memory``.
DEFAULT_SESSION_BYTES = 2 << 30


def resume_token(secret: bytes, session_id: int, nonce: str) -> str:
    """HMAC-SHA256 of the session's id and nonce under the server's secret (an empty
    secret: a random key, so the token cannot be recomputed by anyone)."""
    key = secret or secrets.token_bytes(32)
    return hmac.new(key, f"session {session_id} {nonce}".encode(), hashlib.sha256).hexdigest()


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
    max_session_bytes: int = DEFAULT_SESSION_BYTES
    #: byte bound of the reply cache; None: a quarter of ``max_session_bytes``
    reply_cache_bytes: int | None = None
    #: emulation: this session's compute costs ``s`` x what it measures (a loaded or
    #: smaller cloud); the session reports the scaled time and the transport
    #: waits the difference (``serve --cloud-slowdown``)
    compute_slowdown: float = 1.0
    #: resume tokens are HMACs of the session id under this key (the server's
    #: secret); empty: a random key per session
    resume_secret: bytes = b""
    #: the server saves this session's checkpoints (``serve --state-dir``)
    checkpoints: bool = False
    #: the tail's dropout draws from the process's global RNG instead of the
    #: session's own stream: only for in-process comparisons, where device and
    #: cloud then share one stream and a K=0 split is bit-for-bit centralized
    #: training (a server keeps one stream per session, so a restored session
    #: draws what the original would have, whatever other sessions do)
    shared_rng: bool = False
    #: memory the server's sessions share (``serve --max-memory``); None: only the
    #: per-session limit applies
    memory_budget: MemoryBudget | None = field(default=None, compare=False)

    @property
    def reply_cache_cap(self) -> int:
        return self.reply_cache_bytes if self.reply_cache_bytes is not None else reply_cache_bytes(self.max_session_bytes)


class CloudSession:
    """The tail of one device's model, its optimizer and step bookkeeping."""

    def __init__(self, session_id: int, config: SessionConfig | None = None) -> None:
        self.session_id = session_id
        self.config = config or SessionConfig()
        self.phase = Phase.AWAIT_HELLO
        self.spec: zoo.ModelSpec | None = None
        self.plan: ModelPlan | None = None
        self.batch_size = 0
        self.point = 0
        self.blocks: list[torch.nn.Module] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_config: OptimizerConfig | None = None
        self.replies: OrderedDict[int, Gradients] = OrderedDict()
        self._reply_bytes = 0
        self.applied_steps = 0
        self.last_step = -1
        self.step_ms = ComputeEstimator()
        self.block_ms: list[ComputeEstimator] = []
        self.queue_depth = 0  # set by the transport: frames waiting behind this one
        #: eval batch index -> (loss sum, correct, count): a batch sent again after a
        #: reconnect replaces itself instead of counting twice
        self._eval: dict[int, tuple[float, int, int]] = {}
        #: in the token with the id: a session id that comes again (after a restart)
        #: never accepts an older session's token
        self.nonce = secrets.token_hex(16)
        #: what a device presents to re-attach after its connection dropped
        self.resume_token = resume_token(self.config.resume_secret, session_id, self.nonce)
        self._incoming: StateAssembler | None = None
        self._incoming_plan: WeightsPlan | None = None
        self._incoming_bytes = 0
        self._incoming_refused = 0
        #: (step, point) of the latest repartitions (bounded: a peer may send many)
        self.partition_history: deque[tuple[int, int]] = deque(maxlen=1024)
        self.hello: Hello | None = None  # the accepted Hello (what a restore rebuilds the model from)
        #: this session's torch RNG (the tail's dropout): its own stream, so a restored
        #: session draws what the original would have. (It is swapped into torch's
        #: process-wide generator for the forward pass; sessions computing at the
        #: same moment can interleave their draws: masks stay random, not reproducible.)
        self.rng_state: torch.Tensor | None = None
        #: work for the transport: (step, tensors, manifest) to save before the CheckpointAck goes out
        self.pending_checkpoint: tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None = None
        #: set by `restore`: the step the first resume rolls back to
        self.restored_step = -1
        #: this object's entry in the server's shared memory budget: per object, not
        #: per session id (a restore builds a second object for the same id)
        self.budget_key = next(_BUDGET_KEYS)

    # ------------------------------------------------------------------ entry
    def handle(self, frame: Frame, *, recv_ns: int = 0) -> list[Frame]:
        """Apply one decoded frame; return the frames to send back, in order.

        A refused frame (``WireError``: validated before any state changed)
        becomes an ``Error`` frame and the session stays usable. Anything else
        is a bug or a case validation missed: the peer gets ``INTERNAL`` (no
        details), the server log gets one line, and the session closes, since
        its state may be half-changed. Nothing raises out of here.
        """
        step = getattr(frame, "step", -1)
        step = step if isinstance(step, int) else -1
        try:
            if isinstance(frame, Hello):
                return self._dispatch(frame, recv_ns)  # takes the model lock itself, only to build
            with MODEL_LOCK.shared():
                return self._dispatch(frame, recv_ns)
        except WireError as exc:
            return [Error(code=exc.code, message=exc.message, step=step)]
        except Exception as exc:
            log.error(
                "session %d: internal error on %s (step %d), session closed: %s: %s",
                self.session_id,
                type(frame).__name__,
                step,
                type(exc).__name__,
                str(exc)[:300],
            )
            log.debug("session %d traceback", self.session_id, exc_info=True)
            self.phase = Phase.CLOSED
            return [
                Error(
                    code=ErrorCode.INTERNAL,
                    message=f"internal error in session {self.session_id}; the session is closed",
                    step=step,
                )
            ]

    def _dispatch(self, frame: Frame, recv_ns: int) -> list[Frame]:
        if self.phase is Phase.CLOSED:
            raise WireError(ErrorCode.PROTOCOL, "session is closed")
        if isinstance(frame, Hello):
            return self._on_hello(frame)
        # a frame after the resume answer: the device heard it (and rolled back);
        # a device that dials again before it did is told to roll back again
        self.restored_step = -1
        if self.phase is Phase.AWAIT_HELLO:
            raise WireError(ErrorCode.PROTOCOL, f"expected Hello first, got {type(frame).__name__}")
        if isinstance(frame, Features):
            return self._on_train(frame, recv_ns) if frame.train else self._on_eval(frame)
        if isinstance(frame, EpochEnd):
            return self._on_epoch_end(frame)
        if isinstance(frame, Context):
            if not frame.request:
                return []
            if frame.reply_padding > min(MAX_PADDING, frame.padding):
                # no amplification: the answer carries at most what the request did
                raise WireError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"Context asks for {frame.reply_padding} filler bytes; at most what it carries "
                    f"({frame.padding}) and {MAX_PADDING}",
                )
            return [replace(self.context(frame.step, request_recv_ns=recv_ns), padding=frame.reply_padding)]
        if isinstance(frame, Weights):
            return self._on_weights(frame)
        if isinstance(frame, Repartition):
            return self._on_repartition(frame)
        if isinstance(frame, Checkpoint):
            return self._on_checkpoint(frame)
        if isinstance(frame, Bye):
            self.phase = Phase.CLOSED
            return []
        raise WireError(ErrorCode.PROTOCOL, f"unexpected frame {type(frame).__name__} in phase {self.phase.value}")

    # ------------------------------------------------------------------ hello
    def authenticate(self, hello: Hello) -> None:
        """Refuse a Hello without the server's token (constant-time compare)."""
        if self.config.token is not None and not hmac.compare_digest(
            hello.token.encode("utf-8"), self.config.token.encode("utf-8")
        ):
            raise WireError(ErrorCode.UNAUTHORIZED, "missing or wrong token")

    def _on_hello(self, hello: Hello, *, admit: bool = True) -> list[Frame]:
        """Check everything the Hello claims, cheapest first; build the model last
        (``admit``: a new session, checked against the server's shared memory)."""
        if self.phase is not Phase.AWAIT_HELLO:
            raise WireError(ErrorCode.PROTOCOL, "Hello sent twice on one session")
        self.authenticate(hello)
        check_hello_fields(hello, max_batch=self.config.max_batch)
        opt_cfg = parse_optimizer(hello.optimizer_json)
        try:
            kwargs = json.loads(hello.config_json) if hello.config_json else {}
            if not isinstance(kwargs, dict):
                raise ValueError("config_json must be a JSON object")
            # Shapes, hash and memory from a meta-device build: nothing allocated yet.
            plan = ModelPlan.cached(hello.model, hello.seed, kwargs)
        except Exception as exc:  # noqa: BLE001 - the model config is the peer's: whatever it breaks is its error
            raise WireError(
                ErrorCode.UNKNOWN_MODEL, f"cannot build model {hello.model!r}: {type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        meta = plan.spec
        if hello.model_hash != meta.config_hash:
            raise WireError(
                ErrorCode.MODEL_MISMATCH,
                f"model {hello.model!r} config hash differs (device {hello.model_hash[:12]}, cloud {meta.config_hash[:12]}): "
                "device and cloud run different model versions",
            )
        if hello.runtime != "eager" and hello.program_hash and hello.program_hash != meta.config_hash:
            raise WireError(
                ErrorCode.MODEL_MISMATCH,
                f"the device's {hello.runtime} programs were exported from another model config "
                f"({hello.program_hash[:12]}, cloud {meta.config_hash[:12]}); export them again",
            )
        if hello.num_blocks != meta.model.num_blocks:
            raise WireError(ErrorCode.MODEL_MISMATCH, f"device says {hello.num_blocks} blocks, cloud has {meta.model.num_blocks}")
        self._check_cut(plan, hello.point)
        self._check_memory(plan, hello.point, hello.batch_size, opt_cfg, admit=admit)
        with MODEL_LOCK.exclusive():
            self.spec = zoo.build(hello.model, seed=hello.seed, **kwargs)
        self.plan = plan
        self.batch_size = hello.batch_size
        self.optimizer_config = opt_cfg
        self.hello = replace(hello, token="", resume_token="", resume_session=0, resume_step=-1, resume_restart=False)
        self.rng_state = torch.Generator().manual_seed(hello.seed).get_state()
        self._set_point(hello.point)
        self.phase = Phase.TRAINING
        return [self._ack(hello, f"tail blocks [{self.point}, {self.spec.model.num_blocks}) of {self.spec.name}")]

    def _ack(self, hello: Hello, message: str, *, resumed: bool = False) -> HelloAck:
        return HelloAck(
            session=self.session_id,
            accepted=True,
            point=self.point,
            codec=hello.codec,
            staleness=hello.staleness,
            message=message,
            resume_token=self.resume_token,
            resumed=resumed,
            last_step=self.last_step if resumed else -1,
            restored_step=self.restored_step if resumed else -1,
            checkpoints=self.config.checkpoints,
        )

    def resume(self, hello: Hello) -> list[HelloAck | Error]:
        """Re-attach a device whose connection dropped: it must present the server's
        token, this session's resume token (both compared in constant time) and the
        same model. The answer says the newest step applied; the device re-sends
        the steps still in its window, and the reply cache answers those applied
        already (`_on_train`), so each step is applied exactly once."""
        try:
            if self.phase is not Phase.TRAINING:
                raise WireError(ErrorCode.PROTOCOL, f"session {self.session_id} has ended and cannot be resumed")
            self.authenticate(hello)
            if not hmac.compare_digest(hello.resume_token.encode("utf-8"), self.resume_token.encode("utf-8")):
                raise WireError(ErrorCode.UNAUTHORIZED, f"wrong resume token for session {self.session_id}")
            assert self.spec is not None
            if hello.model_hash != self.spec.config_hash or hello.batch_size != self.batch_size:
                raise WireError(ErrorCode.MODEL_MISMATCH, f"session {self.session_id} trains another model or batch size")
        except WireError as exc:
            return [Error(code=exc.code, message=exc.message, step=-1)]
        if self.restored_step >= 0:
            what = f"restored session {self.session_id} from its checkpoint of step {self.restored_step}"
        else:
            what = f"resumed session {self.session_id} after step {self.last_step}"
        return [self._ack(hello, what, resumed=True)]

    # ------------------------------------------------------------ checkpoints
    def _on_checkpoint(self, frame: Checkpoint) -> list[Frame]:
        """The device drained and asks both sides to save at ``frame.step``.

        The save itself is the transport's I/O: this only checks the point is
        consistent and hands the state over (`pending_checkpoint`)."""
        if frame.step <= self.last_step:
            raise WireError(ErrorCode.PROTOCOL, f"checkpoint at step {frame.step}, but step {self.last_step} is applied already")
        if self._incoming is not None:
            raise WireError(ErrorCode.PROTOCOL, "checkpoint in the middle of a repartition")
        if not self.config.checkpoints:
            return [CheckpointAck(step=frame.step, saved=False, message="this cloud keeps no checkpoints (serve --state-dir)")]
        tensors, manifest = self.checkpoint_state()
        self.pending_checkpoint = (frame.step, tensors, manifest)
        return [CheckpointAck(step=frame.step, saved=True, message=f"session {self.session_id} saved at step {frame.step}")]

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything `restore` needs: the tail's weights, buffers and optimizer
        state, this session's RNG, the counters and the Hello it started from.

        The reply cache is left out on purpose: a checkpoint is taken with nothing
        in flight, so every cached reply has been applied by the device already and
        a roll back never asks for one."""
        assert self.spec is not None and self.hello is not None and self.rng_state is not None
        blocks = range(self.point, self.spec.model.num_blocks)
        params, buffers = named_tensors(self.spec.model, blocks)
        tensors: dict[str, torch.Tensor] = {f"param/{n}": t for n, t in params.items()}
        tensors |= {f"buffer/{n}": t for n, t in buffers.items()}
        tensors |= flatten_optimizer_state(optimizer_state_by_name(self.optimizer, params))
        tensors["rng"] = self.rng_state
        manifest = dict(
            session=self.session_id,
            nonce=self.nonce,
            hello=asdict(self.hello),
            point=self.point,
            last_step=self.last_step,
            applied_steps=self.applied_steps,
            partition_history=list(self.partition_history),
        )
        return tensors, manifest

    @classmethod
    def restore(
        cls, session_id: int, config: SessionConfig, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]
    ) -> CloudSession:
        """A session rebuilt from its checkpoint (after a server restart, or to roll
        back for a device that restarted from the same step)."""
        session = cls(session_id, config)
        session.nonce = str(manifest["nonce"])
        session.resume_token = resume_token(config.resume_secret, session_id, session.nonce)
        # the server's token is not saved: the device presents it again, `resume` checks it
        hello = replace(Hello(**manifest["hello"]), token=config.token or "")
        try:
            return cls._restore_into(session, tensors, manifest, hello)
        except BaseException:
            if config.memory_budget is not None:
                config.memory_budget.release(session.budget_key)
            raise

    @staticmethod
    def _restore_into(
        session: CloudSession, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], hello: Hello
    ) -> CloudSession:
        session_id = session.session_id
        try:
            # the same checks and model build as the first time; a session coming back
            # was admitted once: it is not refused for the shared memory
            session._on_hello(hello, admit=False)
            assert session.plan is not None and session.optimizer_config is not None
            point = int(manifest["point"])
            session._check_memory(session.plan, point, session.batch_size, session.optimizer_config)
        except WireError as exc:
            raise ValueError(f"the checkpoint of session {session_id} no longer builds here: {exc.message}") from None
        assert session.spec is not None
        model = session.spec.model
        session._set_point(point)
        params, buffers = named_tensors(model, range(session.point, model.num_blocks))
        with torch.no_grad():
            for kind, named in (("param", params), ("buffer", buffers)):
                saved = split_state(tensors, kind)
                if set(saved) != set(named):
                    raise ValueError(f"checkpoint of session {session_id} holds other {kind}s than its model")
                for name, t in named.items():
                    t.copy_(saved[name])
        if session.optimizer is not None:
            install_optimizer_state(session.optimizer, params, unflatten_optimizer_state(tensors))
        session.rng_state = tensors["rng"].clone()
        session.last_step = int(manifest["last_step"])
        session.applied_steps = int(manifest["applied_steps"])
        session.partition_history.extend((int(s), int(p)) for s, p in manifest["partition_history"])
        session.restored_step = int(manifest["step"])
        return session

    def _check_cut(self, plan: ModelPlan, point: int) -> None:
        model = plan.spec.model
        # Cut 0 uploads raw inputs; for token/id inputs the cloud would have to trust
        # every id to be in range of its embeddings, so it takes cut 0 for float inputs only.
        # Cut L is device-only training: the cloud holds no block but keeps the
        # session, so the cut can come back.
        valid = [p for p in model.cut_points if p < model.num_blocks and (p > 0 or plan.features[0].dtype.is_floating_point)]
        valid.append(model.num_blocks)
        if point not in valid:
            raise WireError(ErrorCode.PROTOCOL, f"partition point {point} is not a valid cut for the cloud (valid: {valid})")

    def _check_memory(
        self, plan: ModelPlan, point: int, batch: int, opt_cfg: OptimizerConfig, extra: int = 0, *, admit: bool = False
    ) -> None:
        """Refuse what the session's own limit cannot hold, and a new session
        (``admit``) the server's shared memory cannot; record the need in the shared
        budget (while the cut moves, the larger of now and then).

        A running session is never refused for the shared budget: a moved cut,
        weights on their way up or a restore may take the sum above it, by at most
        the per-session limit each, and new Hellos wait until it is free again. A
        refusal in the middle of a run would end a healthy training."""
        need = plan.memory_bytes(point, batch, opt_cfg, reply_cache_cap=self.config.reply_cache_cap) + extra
        if need > self.config.max_session_bytes:
            raise WireError(
                ErrorCode.LIMIT_EXCEEDED,
                f"this session would need about {need / 2**20:.0f} MiB at point {point} (batch {batch}); "
                f"the server allows {self.config.max_session_bytes / 2**20:.0f} MiB per session",
            )
        budget = self.config.memory_budget
        if budget is None:
            return
        if admit:
            budget.reserve(self.budget_key, need)
        else:
            budget.hold(self.budget_key, max(need, self.memory_bytes))

    @property
    def memory_bytes(self) -> int:
        """Estimated memory the session holds at its current cut (0 before its Hello)."""
        if self.plan is None or self.optimizer_config is None:
            return 0
        return self.plan.memory_bytes(
            self.point, self.batch_size, self.optimizer_config, reply_cache_cap=self.config.reply_cache_cap
        )

    def hold_memory(self) -> None:
        """Set the shared budget's reservation to what the current cut needs (after
        a move, or a refused one, settled where the session is)."""
        if self.config.memory_budget is not None and self.plan is not None:
            self.config.memory_budget.hold(self.budget_key, self.memory_bytes + self._incoming_bytes)

    def _set_point(self, point: int) -> None:
        assert self.spec is not None and self.optimizer_config is not None
        self.point = point
        self.blocks = list(self.spec.model.blocks[point:])
        params = [p for b in self.blocks for p in b.parameters()]
        self.optimizer = build_optimizer(params, self.optimizer_config) if params else None
        self.block_ms = [ComputeEstimator() for _ in self.blocks]
        self.step_ms = ComputeEstimator()  # other blocks per step now (none at all when the device trains alone)
        self.hold_memory()

    # ------------------------------------------------------------------ train
    def _inputs(self, frame: Features, *, max_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated, decoded features and labels; refused before decoding if the claims are wrong."""
        assert self.spec is not None and self.plan is not None
        if self.point == self.spec.model.num_blocks:
            raise WireError(ErrorCode.PROTOCOL, f"step {frame.step}: the device trains alone at this cut; no features expected")
        if frame.point != self.point:
            raise WireError(ErrorCode.PROTOCOL, f"features cut at point {frame.point}, session is at point {self.point}")
        target = self.spec.target
        check_features_claim(frame, self.plan.features[self.point], target, max_batch=max_batch)
        assert frame.labels is not None
        feats = codecs.decode_tensor(frame.tensor)
        labels = codecs.decode_tensor(frame.labels)
        return feats, check_features_values(frame, feats, labels, target)

    def _forward(self, x: torch.Tensor, *, timed: bool) -> torch.Tensor:
        for block, ewma in zip(self.blocks, self.block_ms):
            if timed:
                t0 = time.perf_counter()
                x = block(x)
                ewma.observe((time.perf_counter() - t0) * 1e3)
            else:
                x = block(x)
        return x

    def _on_train(self, frame: Features, recv_ns: int) -> list[Frame]:
        cached = self.replies.get(frame.step)
        if cached is not None:  # a re-sent step: answer again, never apply twice
            return [cached]
        if frame.step <= self.last_step:
            raise WireError(ErrorCode.DUPLICATE_STEP, f"step {frame.step} was applied long ago and is no longer cached")
        assert self.spec is not None and self.optimizer_config is not None
        t0 = time.perf_counter()
        # Every check before any state changes: a refused step changes nothing.
        feats, labels = self._inputs(frame, max_batch=self.batch_size)
        grad_codec = parse_grad_codec(frame.grad_codec)
        try:
            lr = self.optimizer_config.lr_at(frame.epoch)
        except ValueError as exc:
            raise WireError(ErrorCode.MALFORMED, f"step {frame.step}: {exc}") from None
        params = [p for b in self.blocks for p in b.parameters()]
        buffers = [t for b in self.blocks for t in b.buffers()]
        saved_buffers = [t.clone() for t in buffers]  # batch-norm statistics move in forward
        feats = feats.detach().requires_grad_(True) if feats.is_floating_point() else feats
        for b in self.blocks:
            b.train(True)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if self.config.shared_rng else torch.random.fork_rng(devices=[]):
            if self.rng_state is not None and not self.config.shared_rng:
                torch.set_rng_state(self.rng_state)
            out = self._forward(feats, timed=True)
            rng_after = torch.get_rng_state()
        loss, correct = self.spec.loss(out, labels)
        loss.backward()
        grad = feats.grad if feats.grad is not None else torch.zeros_like(feats, dtype=torch.float32)
        grads = [p.grad for p in params if p.grad is not None]
        finite = (
            bool(torch.isfinite(loss))
            and bool(torch.isfinite(grad).all())
            and (not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))))
        )
        if not finite:
            with torch.no_grad():
                for t, saved in zip(buffers, saved_buffers):
                    t.copy_(saved)
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            raise WireError(
                ErrorCode.BAD_TENSOR,
                f"step {frame.step}: loss or gradients are not finite (training diverged?); step not applied",
            )
        if self.optimizer is not None:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.rng_state = rng_after
        grad_frame, _ = codecs.encode_tensor(grad, grad_codec)
        cloud_ms = (time.perf_counter() - t0) * 1e3 * self.config.compute_slowdown
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
        self._cache(reply)
        self.last_step = frame.step
        self.applied_steps += 1
        out_frames: list[Frame] = []
        if self.config.context_every and self.applied_steps % self.config.context_every == 0:
            # Before the gradient: a small frame on an idle downlink is what lets the
            # device tell latency from bandwidth.
            out_frames.append(self.context(frame.step))
        out_frames.append(reply)
        return out_frames

    def _cache(self, reply: Gradients) -> None:
        """Keep the reply for re-delivery, within the cache's count and byte bounds.

        A re-sent step older than what is kept is refused with DUPLICATE_STEP
        (a clear error, never a second application)."""
        assert reply.tensor is not None
        self.replies[reply.step] = reply
        self._reply_bytes += reply.tensor.nbytes
        cap = self.config.reply_cache_cap
        while len(self.replies) > 1 and (len(self.replies) > REPLY_CACHE_SIZE or self._reply_bytes > cap):
            _, old = self.replies.popitem(last=False)
            assert old.tensor is not None
            self._reply_bytes -= old.tensor.nbytes

    # ------------------------------------------------------------------- eval
    def _on_eval(self, frame: Features) -> list[Frame]:
        assert self.spec is not None
        feats, labels = self._inputs(frame, max_batch=eval_batch_limit(self.batch_size))
        for b in self.blocks:
            b.train(False)
        with torch.no_grad():
            out = self._forward(feats, timed=False)
            loss, correct = self.spec.loss(out, labels)
        n = int(labels.shape[0])
        self._eval[frame.step] = (float(loss) * n, int(correct), n)
        return []

    def _on_epoch_end(self, frame: EpochEnd) -> list[Frame]:
        if frame.train:
            return []
        batches, self._eval = self._eval.values(), {}
        loss = sum(b[0] for b in batches)
        count = sum(b[2] for b in batches)
        return [
            EvalResult(epoch=frame.epoch, loss=loss / count if count else 0.0, correct=sum(b[1] for b in batches), count=count)
        ]

    # ------------------------------------------------------------ repartition
    def _tail_params(self) -> dict[str, torch.Tensor]:
        assert self.spec is not None
        return named_tensors(self.spec.model, range(self.point, self.spec.model.num_blocks))[0]

    def _on_weights(self, frame: Weights) -> list[Frame]:
        """Buffer one chunk of state moving up for the next repartition.

        Only entries the device can hold at this cut are accepted, each with its
        exact shape, so what is buffered is bounded by the head's size; it also
        counts against the session's memory budget.
        """
        assert self.plan is not None and self.optimizer_config is not None
        if self._incoming_plan is None:
            self._incoming_plan = WeightsPlan(self.plan, self.point, self.optimizer_config)
        try:
            nbytes = self._incoming_plan.check(frame)
            self._check_memory(self.plan, self.point, self.batch_size, self.optimizer_config, extra=self._incoming_bytes + nbytes)
            check_weights_values(frame, codecs.decode_tensor(frame.tensor))  # a lossless view: no copy
        except WireError:
            self._incoming_refused += 1  # the repartition these belong to is refused too
            raise
        if self._incoming is None:
            self._incoming = StateAssembler()
        self._incoming.add(frame)
        self._incoming_bytes += nbytes
        return []

    def _take_incoming(self) -> StateAssembler | None:
        incoming, self._incoming = self._incoming, None
        refused, self._incoming_refused = self._incoming_refused, 0
        self._incoming_plan, self._incoming_bytes = None, 0
        if refused:
            raise WireError(ErrorCode.PROTOCOL, f"{refused} weights frame(s) of this repartition were refused; the cut stays")
        return incoming

    def _on_repartition(self, frame: Repartition) -> list[Frame]:
        """Move the cut. The device has drained its in-flight steps before asking.

        Everything that arrived is checked (complete chunks, every parameter of
        the moving blocks, whole optimizer state per parameter, the new cut's
        memory) before the model or the optimizer is touched.
        """
        try:
            return self._move_cut(frame)
        finally:
            self.hold_memory()  # moved or refused: the reservation is what the cut in effect needs

    def _move_cut(self, frame: Repartition) -> list[Frame]:
        assert self.spec is not None and self.plan is not None and self.optimizer_config is not None
        model = self.spec.model
        new, old = frame.point, self.point
        incoming = self._take_incoming()
        self._check_cut(self.plan, new)
        self._check_memory(self.plan, new, self.batch_size, self.optimizer_config)
        state = optimizer_state_by_name(self.optimizer, self._tail_params())
        out: list[Frame] = []
        if frame.state_hash and not _HEX64.fullmatch(frame.state_hash):
            raise WireError(ErrorCode.MALFORMED, "Repartition.state_hash must be 64 lowercase hex digits (SHA-256)")
        coming_down = set(named_tensors(model, range(old, new))[0]) if new > old else set()
        # the device hashes its copy with no optimizer state: trained blocks cannot match
        untrained = not any(state.get(name) for name in coming_down)
        matched = (
            new > old
            and bool(frame.state_hash)
            and untrained
            and hmac.compare_digest(frame.state_hash, state_hash(model, range(old, new), state))
        )
        if new > old and not matched:  # blocks [old, new) go to the device
            out += export_state(model, range(old, new), state, step=frame.step)
        elif new < old:  # blocks [new, old) arrive from the device
            moving = set(range(new, old))
            received = incoming.tensors() if incoming is not None else {}
            tensors = {key: t for key, t in received.items() if block_index(key[1].split("/")[0]) in moving}
            check_complete(model, moving, tensors, new)
            keys: dict[str, set[str]] = {}
            for kind, name in tensors:
                if kind == "optim":
                    pname, _, key = name.rpartition("/")
                    keys.setdefault(pname, set()).add(key)
            check_optimizer_entries(keys, self.optimizer_config.state_keys)
            state.update(import_state(model, tensors))
        self._set_point(new)
        if self.optimizer is not None:
            install_optimizer_state(self.optimizer, self._tail_params(), state)
        self.partition_history.append((frame.step, new))
        note = " (the device's copy of the blocks matched: no weights sent)" if matched else ""
        out.append(
            RepartitionAck(
                step=frame.step, point=new, accepted=True, message=f"cut moved {old} -> {new}{note}", state_matched=matched
            )
        )
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
