"""Per-block profiles: what the decision engine needs to price a partition point.

``python -m edge_sdk profile --model M --batch-size B [--optimizer sgd|adam] [--json PATH]``

Measured on this machine, per block: forward and backward wall time (median of
``repeats`` after ``warmup``), parameter / buffer bytes, optimizer-state bytes
(measured by taking one real optimizer step, so it is what would migrate), the
block's output (= the cut tensor after it) shape and encoded bytes per codec, and
activation memory (tensors autograd saves for backward, plus the output).
Device estimates scale the times by a named slowdown (:mod:`edge_sdk.devices`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_sdk.decision.cost_model import AUTO_CODECS


def encoded_nbytes(shape: tuple[int, ...], codec: str, dtype: torch.dtype = torch.float32) -> int:
    """Payload bytes of a tensor of ``shape`` sent with ``codec``.

    Float tensors use the shared ``schemas.codecs.encoded_nbytes`` (the exact wire
    size). Integer tensors (token / id inputs at ``p = 0``) are never quantized:
    their raw size is returned for every codec."""
    n = 1
    for s in shape:
        n *= int(s)
    if not dtype.is_floating_point:
        return n * torch.empty((), dtype=dtype).element_size()
    from schemas.codecs import encoded_nbytes as _shared

    return int(_shared(tuple(shape), codec))


@dataclass
class BlockProfile:
    index: int
    name: str
    forward_ms: float
    backward_ms: float
    param_count: int
    param_bytes: int
    buffer_bytes: int
    optimizer_state_bytes: int
    output_shape: list[int]  # including the batch dimension
    output_bytes: dict[str, int]  # codec -> bytes of the cut at p = index + 1
    activation_bytes: int  # saved for backward by this block (parameters excluded)
    peak_activation_bytes: int  # activation_bytes + output bytes (fp32)


@dataclass
class ModelProfile:
    model: str
    config_hash: str
    batch_size: int
    optimizer: str
    runtime: str
    threads: int
    torch_version: str
    input_shape: list[int]  # including the batch dimension
    input_dtype: str
    input_bytes: dict[str, int]  # codec -> bytes of the cut at p = 0 (raw input)
    cut_points: list[int]
    repeats: int
    blocks: list[BlockProfile] = field(default_factory=list)

    def cut_bytes(self, p: int, codec: str = "fp32") -> int:
        """Bytes crossing the cut at partition point ``p`` for one batch."""
        return self.input_bytes[codec] if p == 0 else self.blocks[p - 1].output_bytes[codec]

    def cuts(self) -> list[dict[str, Any]]:
        """Per valid partition point: head compute (forward+backward) and memory,
        tail compute, and the cut size per codec."""
        out = []
        for p in self.cut_points:
            head, tail = self.blocks[:p], self.blocks[p:]
            out.append(
                {
                    "p": p,
                    "head_forward_ms": sum(b.forward_ms for b in head),
                    "head_backward_ms": sum(b.backward_ms for b in head),
                    "tail_forward_ms": sum(b.forward_ms for b in tail),
                    "tail_backward_ms": sum(b.backward_ms for b in tail),
                    "head_param_bytes": sum(b.param_bytes for b in head),
                    "head_optimizer_state_bytes": sum(b.optimizer_state_bytes for b in head),
                    "head_activation_bytes": sum(b.activation_bytes for b in head),
                    "cut_bytes": {c: self.cut_bytes(p, c) for c in self.input_bytes},
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cuts"] = self.cuts()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelProfile:
        d = {k: v for k, v in d.items() if k != "cuts"}
        blocks = [BlockProfile(**b) for b in d.pop("blocks")]
        return cls(**d, blocks=blocks)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer training would build (its state is what migrates); raises
    ``ValueError`` naming the known ones."""
    from edge_sdk.optim import OptimizerConfig, build_optimizer

    return build_optimizer(params, OptimizerConfig(name=name))


def _example_batch(spec, batch_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = (batch_size, *spec.input_shape)
    if spec.input_dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=spec.input_dtype)
    return torch.ones(shape, dtype=spec.input_dtype)  # id 1 is valid for every id input


def _profile_block(
    i: int, name: str, block: nn.Module, x: torch.Tensor, optimizer: str, repeats: int, warmup: int, codecs: tuple[str, ...]
) -> tuple[BlockProfile, torch.Tensor]:
    params = [p for p in block.parameters() if p.requires_grad]
    needs_input_grad = i > 0 and x.dtype.is_floating_point
    x_in = x.detach().requires_grad_(needs_input_grad)
    param_ptrs = {p.data_ptr() for p in block.parameters()}
    fwd, bwd = [], []
    out = None
    grad = None
    for r in range(warmup + repeats):
        for p in params:
            p.grad = None
        x_in.grad = None
        t0 = time.perf_counter()
        out = block(x_in)
        t1 = time.perf_counter()
        if grad is None:
            grad = torch.randn_like(out) if out.dtype.is_floating_point else None
        if grad is not None and (params or needs_input_grad) and out.requires_grad:
            out.backward(grad)
        t2 = time.perf_counter()
        if r >= warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
    # activation memory: what autograd keeps for backward during one forward
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in param_ptrs:
            saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x_in)
    act = sum(saved.values())
    # optimizer state: take one real step and measure what the optimizer allocated
    opt_bytes = 0
    if params:
        if grad is not None and out.requires_grad:
            for p in params:
                p.grad = None
            out.backward(grad)
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            opt = _make_optimizer(optimizer, with_grad)
            opt.step()
            opt_bytes = sum(_nbytes(v for v in st.values() if torch.is_tensor(v)) for st in opt.state.values())
    out = out.detach()
    shape = tuple(out.shape)
    prof = BlockProfile(
        index=i,
        name=name,
        forward_ms=statistics.median(fwd),
        backward_ms=statistics.median(bwd),
        param_count=sum(p.numel() for p in block.parameters()),
        param_bytes=_nbytes(block.parameters()),
        buffer_bytes=_nbytes(block.buffers()),
        optimizer_state_bytes=opt_bytes,
        output_shape=list(shape),
        output_bytes={c: encoded_nbytes(shape, c, out.dtype) for c in codecs},
        activation_bytes=act,
        peak_activation_bytes=act + out.numel() * out.element_size(),
    )
    return prof, out


def profile_model(
    spec,
    batch_size: int,
    optimizer: str = "sgd",
    runtime: str = "eager",
    repeats: int = 5,
    warmup: int = 1,
    codecs: tuple[str, ...] = AUTO_CODECS,
) -> ModelProfile:
    """Profile every block of ``spec.model`` (a copy: the caller's weights, BatchNorm
    statistics and RNG are untouched) in train mode at ``batch_size``."""
    if runtime != "eager":
        raise ValueError(f"runtime {runtime!r} cannot be profiled here; only 'eager' is supported")
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch_size and repeats must be >= 1, warmup >= 0")
    _make_optimizer(optimizer, [nn.Parameter(torch.zeros(1))])  # validate the name early
    model = copy.deepcopy(spec.model).train()
    x = _example_batch(spec, batch_size)
    blocks: list[BlockProfile] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i, (name, block) in enumerate(zip(model.block_names, model.blocks)):
            prof, x = _profile_block(i, name, block, x, optimizer, repeats, warmup, codecs)
            blocks.append(prof)
    in_shape = (batch_size, *spec.input_shape)
    return ModelProfile(
        model=spec.name,
        config_hash=spec.config_hash,
        batch_size=batch_size,
        optimizer=optimizer,
        runtime=runtime,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        input_shape=list(in_shape),
        input_dtype=str(spec.input_dtype).replace("torch.", ""),
        input_bytes={c: encoded_nbytes(in_shape, c, spec.input_dtype) for c in codecs},
        cut_points=spec.model.cut_points,
        repeats=repeats,
        blocks=blocks,
    )


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(prof: ModelProfile, slowdown: float = 1.0, device: str | None = None) -> str:
    """A readable per-block table (times scaled by ``slowdown`` when a device is named)."""
    codecs = list(prof.input_bytes)
    head = f"{prof.model}  batch={prof.batch_size}  optimizer={prof.optimizer}  runtime={prof.runtime}  threads={prof.threads}"
    if device:
        head += f"  times x{slowdown:g} for {device}"
    cols = ["#", "block", "fwd ms", "bwd ms", "params", "opt state", "act mem", "out shape"] + [f"cut {c}" for c in codecs]
    rows = [
        ["in", "(input)", "", "", "", "", "", "x".join(map(str, prof.input_shape))]
        + [_fmt_bytes(prof.input_bytes[c]) for c in codecs]
    ]
    for b in prof.blocks:
        rows.append(
            [
                str(b.index),
                b.name[:28],
                f"{b.forward_ms * slowdown:.2f}",
                f"{b.backward_ms * slowdown:.2f}",
                _fmt_bytes(b.param_bytes),
                _fmt_bytes(b.optimizer_state_bytes),
                _fmt_bytes(b.peak_activation_bytes),
                "x".join(map(str, b.output_shape)),
            ]
            + [_fmt_bytes(b.output_bytes[c]) for c in codecs]
        )
    tot_f = sum(b.forward_ms for b in prof.blocks) * slowdown
    tot_b = sum(b.backward_ms for b in prof.blocks) * slowdown
    rows.append(
        [
            "",
            "total",
            f"{tot_f:.2f}",
            f"{tot_b:.2f}",
            _fmt_bytes(sum(b.param_bytes for b in prof.blocks)),
            _fmt_bytes(sum(b.optimizer_state_bytes for b in prof.blocks)),
            _fmt_bytes(sum(b.peak_activation_bytes for b in prof.blocks)),
            "",
        ]
        + [""] * len(codecs)
    )
    widths = [max(len(r[j]) for r in [cols, *rows]) for j in range(len(cols))]
    line = lambda r: "  ".join(c.rjust(w) if j not in (1,) else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
    out = [head, line(cols), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    L = len(prof.blocks)
    interior = [p for p in prof.cut_points if 0 < p < L]
    out.append(f"cut points for --point: {interior}, or {L} / 'device' (the whole model on the device)")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The same names, defaults and choices as ``train`` / ``emulate`` (from `TrainConfig`)."""
    from edge_sdk import devices, zoo
    from edge_sdk.optim import OPTIMIZERS
    from edge_sdk.runtime import RUNTIMES
    from edge_sdk.training import TrainConfig

    parser.add_argument("--model", default=TrainConfig.model, choices=zoo.names(), help="zoo model (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="samples per step (default: %(default)s)")
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=TrainConfig.optimizer,
        help="optimizer whose state size is measured (default: %(default)s, with momentum)",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="eager",
        help="also time the head as this runtime runs it, per exported point (needs --programs) (default: %(default)s)",
    )
    parser.add_argument(
        "--programs", type=Path, default=None, metavar="DIR", help="exported programs (python -m export) for --runtime"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the profile as JSON here (default: not written)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per block, median reported (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per block first (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="model init seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--device",
        default=None,
        type=devices.parse_device,
        metavar="DEVICE",
        help=f"also scale the printed times by this device's slowdown: {devices.choices_text()} (default: none)",
    )


def profile_heads(spec, runtime: str, programs: Path, batch_size: int, repeats: int) -> list[dict]:
    """Time the head of every exported point as ``runtime`` runs it, against eager.

    The decision engine must see the speed of the runtime that really runs the
    head; this is that measurement (``edge_sdk.timing.profile_runtime``)."""
    from edge_sdk.runtime import EagerRuntime, load_manifest, load_runtime
    from edge_sdk.timing import profile_runtimes

    manifest = load_manifest(programs)
    if manifest.get("config_hash") != spec.config_hash:
        raise ValueError(f"the programs in {programs} were exported from another model config")
    if int(manifest.get("batch_size", -1)) != batch_size:
        raise ValueError(f"the programs in {programs} have batch size {manifest.get('batch_size')}, not {batch_size}")
    out = []
    x = spec.example_input(batch_size)
    for point in sorted(int(p) for p in manifest["points"]):
        model = copy.deepcopy(spec.model)
        eager = EagerRuntime(model.head(point))
        with torch.no_grad():
            grad = torch.randn_like(eager.forward(x, train=False))
        timed = profile_runtimes(
            {"eager": eager, "runtime": load_runtime(runtime, programs, point, model.state_dict())}, x, grad, repeats
        )
        e, r = timed["eager"], timed["runtime"]
        out.append(
            dict(
                point=point,
                eager_step_ms=e["step_ms"],
                runtime_step_ms=r["step_ms"],
                eager_forward_ms=e["forward_ms"],
                runtime_forward_ms=r["forward_ms"],
                ratio=r["step_ms"] / e["step_ms"],
            )
        )
    return out


def run(args: argparse.Namespace) -> int:
    from edge_sdk import devices, zoo

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = zoo.build(args.model, seed=args.seed)
    if args.runtime != "eager" and args.programs is None:
        print(f"error: --runtime {args.runtime} needs --programs DIR (made by `python -m export`)", file=sys.stderr)
        return 2
    prof = profile_model(
        spec, args.batch_size, optimizer=args.optimizer, runtime="eager", repeats=args.repeats, warmup=args.warmup
    )
    dev = devices.get_device(args.device) if args.device else None
    print(format_table(prof, dev.slowdown if dev else 1.0, dev.name if dev else None))
    heads = None
    if args.runtime != "eager":
        try:
            heads = profile_heads(spec, args.runtime, args.programs, args.batch_size, args.repeats)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"\nhead step (forward + replayed forward + backward) per exported point, {args.runtime} vs eager:")
        print("  point  eager ms  " + f"{args.runtime} ms".rjust(14) + "   ratio")
        for h in heads:
            print(f"  {h['point']:>5}  {h['eager_step_ms']:8.2f}  {h['runtime_step_ms']:14.2f}  {h['ratio']:6.2f}x")
    if args.json:
        doc = prof.to_dict()
        if heads is not None:
            doc["runtime"] = {"name": args.runtime, "heads": heads}
        if dev:
            doc["device"] = dev.to_dict()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
