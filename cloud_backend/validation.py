"""Everything a peer's frame claims, checked before the session changes any state.

A cloud session trusts nothing a device sends. The checks here run in two
stages, so that a hostile frame costs neither memory nor compute:

1. **Claims** (`check_features_claim`, `WeightsPlan.check`, `check_hello_fields`):
   shapes, dtypes, codecs, enums and counts as the frame states them, against
   what the session's model can legitimately receive. Nothing is decoded or
   allocated from the frame before these pass, so a 176-byte top-k frame that
   claims a 262 MB tensor is refused for the price of reading its header.
2. **Values** (`check_features_values`): after decoding, features must be
   finite and targets in range (class ids in ``[0, num_classes)``).

What is legitimate comes from a *plan* built once per model at ``Hello`` on
PyTorch's meta device (`ModelPlan`): per-sample feature shapes at every cut,
each parameter's and buffer's shape and dtype, and a memory estimate, all
without allocating the model. A ``Hello`` whose config hash is wrong, or whose
model would not fit the session's memory budget, is refused before anything is
built.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

from cloud_backend.model_lock import MODEL_LOCK
from edge_sdk import zoo
from edge_sdk.migration import block_index, chunk_shapes
from edge_sdk.optim import OptimizerConfig
from schemas.codecs import Codec, DType, TensorFrame
from schemas.errors import ErrorCode, WireError
from schemas.frames import MAX_EVAL_BATCH, Features, Hello, Weights

#: The largest feature-replay window a device may declare. Far above what pays
#: on any link (the decision engine tries up to 8 by default).
MAX_STALENESS = 64
#: Train replies kept for idempotent re-delivery: a device never has more than
#: K+1 steps in flight, so twice the largest window is always enough. The cache
#: is also bounded in bytes (`reply_cache_bytes`): with big cut features a deep
#: window of fp32 gradients would otherwise dominate the session's memory.
REPLY_CACHE_SIZE = 2 * (MAX_STALENESS + 1)


def reply_cache_bytes(session_bytes: int) -> int:
    """The reply cache's share of a session's memory budget."""
    return session_bytes // 4


#: Runtimes a device may run its head in.
RUNTIMES = ("eager", "executorch", "torchscript")


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(int(d) for d in shape)


# --------------------------------------------------------------------- hello
def check_hello_fields(hello: Hello, *, max_batch: int) -> None:
    """Scalar fields of a Hello: known codec and runtime, sane K and batch size."""
    try:
        Codec.parse(hello.codec or "fp32")
    except ValueError as exc:
        raise WireError(ErrorCode.MALFORMED, f"Hello: {exc}") from None
    if not 0 <= hello.staleness <= MAX_STALENESS:
        raise WireError(ErrorCode.MALFORMED, f"Hello: staleness {hello.staleness} outside [0, {MAX_STALENESS}]")
    if not 1 <= hello.batch_size <= max_batch:
        raise WireError(ErrorCode.MALFORMED, f"Hello: batch size {hello.batch_size} outside [1, {max_batch}]")
    if hello.runtime and hello.runtime not in RUNTIMES:
        raise WireError(ErrorCode.MALFORMED, f"Hello: unknown runtime {hello.runtime!r}; known: {', '.join(RUNTIMES)}")


def parse_optimizer(text: str) -> OptimizerConfig:
    try:
        return OptimizerConfig.from_json(text)
    except (ValueError, TypeError) as exc:
        raise WireError(ErrorCode.MALFORMED, f"bad optimizer config: {exc}") from None


def parse_grad_codec(label: str) -> Codec:
    try:
        return Codec.parse(label or "fp32")
    except ValueError as exc:
        raise WireError(ErrorCode.MALFORMED, f"gradient codec: {exc}") from None


# ---------------------------------------------------------------------- plan
@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ModelPlan:
    """What a session's model can legitimately receive, computed without building it.

    ``features[p]`` is the per-sample tensor entering block ``p`` (``p = 0``: the
    model's input). ``state[name]`` is every parameter (``kind="param"``) and
    buffer (``"buffer"``) by full-model name.
    """

    spec: zoo.ModelSpec  # built on the meta device: shapes only
    features: tuple[TensorSpec, ...]
    params: dict[str, TensorSpec]
    buffers: dict[str, TensorSpec]

    @classmethod
    def cached(cls, name: str, seed: int, kwargs: dict) -> ModelPlan:
        """`build`, memoized per (name, seed, config): repeated Hellos never re-trace.

        Tracing some models takes the process-wide model lock for about a second;
        a peer looping Hellos would otherwise stall every session's compute."""
        return _cached_plan(name, seed, json.dumps(kwargs, sort_keys=True))

    @classmethod
    def build(cls, name: str, seed: int, kwargs: dict) -> ModelPlan:
        """Plan ``name`` on the meta device (under the model lock: building may FX-trace)."""
        with MODEL_LOCK.exclusive():
            return cls._build(name, seed, kwargs)

    @classmethod
    def _build(cls, name: str, seed: int, kwargs: dict) -> ModelPlan:
        with torch.device("meta"):
            spec = zoo.build(name, seed=seed, **kwargs)
            model = spec.model
            x = spec.example_input(1)
            feats = [TensorSpec(tuple(x.shape[1:]), x.dtype)]
            model.train(False)
            with torch.no_grad():
                for block in model.blocks:
                    x = block(x)
                    feats.append(TensorSpec(tuple(x.shape[1:]), x.dtype))
        params = {n: TensorSpec(tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
        buffers = {n: TensorSpec(tuple(b.shape), b.dtype) for n, b in model.named_buffers()}
        return cls(spec=spec, features=tuple(feats), params=params, buffers=buffers)

    def memory_bytes(self, point: int, batch: int, optimizer: OptimizerConfig, *, reply_cache_cap: int) -> int:
        """Estimated peak memory of a session at ``point``.

        The whole model (the cloud builds it all from the seed), the tail's
        gradients and optimizer slots, the reply cache (fp32 feature gradients,
        up to its byte cap), and the larger of one train step's activations
        (twice the tail's feature maps: forward outputs kept for the backward,
        plus their gradients) and one eval batch (the largest feature map, in
        and out).
        """
        model = sum(t.nbytes for t in self.params.values()) + sum(t.nbytes for t in self.buffers.values())
        tail = sum(t.nbytes for n, t in self.params.items() if block_index(n) >= point)
        slots = len(optimizer.state_keys - {"step"})
        reply = min(REPLY_CACHE_SIZE * batch * self.features[point].nbytes, reply_cache_cap)
        train = 2 * batch * sum(f.nbytes for f in self.features[point:])
        evaluation = 2 * eval_batch_limit(batch) * max(f.nbytes for f in self.features[point:])
        return model + tail * (1 + slots) + reply + max(train, evaluation)


def eval_batch_limit(batch_size: int) -> int:
    """The most samples one evaluation frame may carry (see `schemas.frames.MAX_EVAL_BATCH`)."""
    return max(batch_size, MAX_EVAL_BATCH)


@functools.lru_cache(maxsize=64)
def _cached_plan(name: str, seed: int, kwargs_json: str) -> ModelPlan:
    return ModelPlan.build(name, seed, json.loads(kwargs_json))


# ------------------------------------------------------------------ features
def _decoded_dtype(tf: TensorFrame) -> DType:
    return tf.dtype if tf.codec is Codec.NONE else tf.orig_dtype


def check_features_claim(frame: Features, expected: TensorSpec, target: zoo.TargetSpec, *, max_batch: int) -> None:
    """Shape, dtype and codec of features and labels, before either is decoded."""
    tf = frame.tensor
    shape = tuple(tf.shape)
    if not shape or tuple(shape[1:]) != expected.shape:
        raise WireError(
            ErrorCode.BAD_TENSOR,
            f"step {frame.step}: features of shape {shape}; the cut at point {frame.point} carries (B, {', '.join(map(str, expected.shape))})",
        )
    batch = shape[0]
    if not 1 <= batch <= max_batch:
        raise WireError(ErrorCode.LIMIT_EXCEEDED, f"step {frame.step}: batch {batch} outside [1, {max_batch}]")
    if _decoded_dtype(tf).torch != expected.dtype:
        raise WireError(
            ErrorCode.BAD_TENSOR,
            f"step {frame.step}: features decode to {_decoded_dtype(tf).name}, the cut carries {expected.dtype}",
        )
    labels = frame.labels
    if labels is None:
        raise WireError(ErrorCode.MALFORMED, f"step {frame.step}: features without labels")
    if labels.codec is not Codec.NONE:
        raise WireError(
            ErrorCode.BAD_TENSOR, f"step {frame.step}: labels must travel uncompressed, got codec {labels.codec.label}"
        )
    why = target.check_claim(tuple(labels.shape), labels.dtype.is_float, batch)
    if why:
        raise WireError(ErrorCode.BAD_TENSOR, f"step {frame.step}: {why}")
    if not frame.step >= 0:
        raise WireError(ErrorCode.MALFORMED, f"step id {frame.step} is negative")


def check_features_values(frame: Features, feats: torch.Tensor, labels: torch.Tensor, target: zoo.TargetSpec) -> torch.Tensor:
    """Refuse non-finite features or out-of-range targets; return the targets as the loss takes them."""
    if feats.is_floating_point() and not bool(torch.isfinite(feats).all()):
        raise WireError(ErrorCode.BAD_TENSOR, f"step {frame.step}: features contain NaN or Inf")
    why = target.check_values(labels)
    if why:
        raise WireError(ErrorCode.BAD_TENSOR, f"step {frame.step}: {why}")
    return target.prepare(labels)


# ------------------------------------------------------------------- weights
class WeightsPlan:
    """The ``Weights`` frames a repartition may legitimately bring to the cloud.

    Only blocks the device holds (``[0, point)``) can move up; each entry must
    have its exact name, kind, dtype, chunk count and chunk shape, and the
    lossless codec. So what a session buffers for a repartition is bounded by
    the head's own size, whatever a peer sends.
    """

    def __init__(self, plan: ModelPlan, point: int, optimizer: OptimizerConfig) -> None:
        self._entries: dict[tuple[str, str], TensorSpec] = {}
        for name, spec in plan.params.items():
            if block_index(name) < point:
                self._entries[("param", name)] = spec
                for key in optimizer.state_keys:
                    shape = () if key == "step" else spec.shape
                    self._entries[("optim", f"{name}/{key}")] = TensorSpec(shape, torch.float32)
        for name, spec in plan.buffers.items():
            if block_index(name) < point:
                self._entries[("buffer", name)] = spec

    def check(self, frame: Weights) -> int:
        """Refuse a frame that does not belong to the plan; return its decoded size in bytes."""
        spec = self._entries.get((frame.kind, frame.name))
        if spec is None:
            raise WireError(
                ErrorCode.MODEL_MISMATCH, f"weights {frame.kind} {frame.name!r} cannot come from the device at this cut"
            )
        tf = frame.tensor
        if tf.codec is not Codec.NONE:
            raise WireError(
                ErrorCode.BAD_TENSOR, f"weights {frame.name}: migrated state travels uncompressed, got codec {tf.codec.label}"
            )
        if tf.dtype.torch != spec.dtype:
            raise WireError(ErrorCode.BAD_TENSOR, f"weights {frame.name}: dtype {tf.dtype.name}, the model has {spec.dtype}")
        pieces = chunk_shapes(spec.shape)
        if frame.chunks != len(pieces) or not 0 <= frame.chunk < len(pieces):
            raise WireError(
                ErrorCode.MALFORMED, f"weights {frame.name}: chunk {frame.chunk} of {frame.chunks}, expected {len(pieces)} chunks"
            )
        if tuple(tf.shape) != pieces[frame.chunk]:
            raise WireError(
                ErrorCode.MODEL_MISMATCH,
                f"weights {frame.name} chunk {frame.chunk}: shape {tuple(tf.shape)}, expected {pieces[frame.chunk]}",
            )
        return tf.numel * tf.dtype.torch.itemsize


def check_weights_values(frame: Weights, value: torch.Tensor) -> None:
    """Migrated state must be usable: finite floats, a step count >= 0, second moments >= 0."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise WireError(ErrorCode.BAD_TENSOR, f"weights {frame.name}: NaN or Inf")
    key = frame.name.rpartition("/")[2] if frame.kind == "optim" else ""
    if key == "step" and value.numel() and (float(value.min()) < 0 or not bool((value == value.round()).all())):
        raise WireError(ErrorCode.BAD_TENSOR, f"weights {frame.name}: the step count must be a whole number >= 0")
    if key == "exp_avg_sq" and value.numel() and float(value.min()) < 0:
        raise WireError(ErrorCode.BAD_TENSOR, f"weights {frame.name}: second moments must be >= 0")


def check_optimizer_entries(keys_by_param: dict[str, set[str]], state_keys: frozenset[str]) -> None:
    """Optimizer state moves whole per parameter (all slots, or none): a partial
    state would break the optimizer's next step, long after the repartition."""
    for pname, keys in keys_by_param.items():
        if keys != set(state_keys):
            raise WireError(
                ErrorCode.MALFORMED, f"optimizer state for {pname}: got {sorted(keys)}, expected {sorted(state_keys)}"
            )


__all__ = [
    "MAX_STALENESS",
    "REPLY_CACHE_SIZE",
    "ModelPlan",
    "TensorSpec",
    "WeightsPlan",
    "check_features_claim",
    "check_features_values",
    "check_hello_fields",
    "check_optimizer_entries",
    "check_weights_values",
    "eval_batch_limit",
    "parse_grad_codec",
    "parse_optimizer",
    "reply_cache_bytes",
]
