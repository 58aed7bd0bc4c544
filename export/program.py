"""Turn an eager head into functional, export-ready programs.

Why this module exists: an ahead-of-time program cannot see Python state, so every
piece of state the eager head keeps implicitly is made an explicit input or output:

* **Parameters** are inputs of the forward methods, so the runtime owns one copy of
  the weights and every method sees the same values (the joint forward+backward
  program keeps them as its own mutable weights; the runtime hands those very
  tensors to the forward methods).
* **BatchNorm running statistics** are inputs, and the train-mode forward returns
  their updated values. Train-mode ``native_batch_norm`` has no portable ExecuTorch
  kernel, so :class:`ExportBatchNorm` writes the normalisation out in elementary
  ops (mean, biased variance, rsqrt) that every backend has. With
  ``freeze_batchnorm=True`` it uses the running statistics everywhere instead.
* **Dropout masks** are inputs. The runtime draws them from torch's RNG exactly the
  way eager ``F.dropout`` does on CPU (``empty_like(x).bernoulli_(1-p).div_(1-p)``),
  so restoring the RNG state before a replay reproduces the step's mask, and the
  program's features are bit-comparable with eager PyTorch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from export.layers import ExportBatchNorm, MaskedDropout, _Context, _window_pool
from export.layout import rewrite_for_executorch


@contextlib.contextmanager
def _swapped_parameters(module: nn.Module, params: dict[str, torch.Tensor]) -> Iterator[None]:
    """Make ``module`` compute with ``params`` (tensors, e.g. graph inputs).

    ``torch.func.functional_call`` does the same but refuses modules being traced by
    ``torch.jit``, and the TorchScript export traces these wrappers.
    """
    saved = []
    try:
        for name, value in params.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = value
        yield
    finally:
        for owner, leaf, value in reversed(saved):
            owner._parameters[leaf] = value


class UnsupportedLayerError(NotImplementedError):
    """A layer the exporter cannot turn into a correct program; names the operator."""

    def __init__(self, operator: str, detail: str) -> None:
        self.operator = operator
        super().__init__(f"operator {operator}: {detail}")


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class PreparedHead:
    """A rewritten copy of a head plus the ordered specs of its explicit state."""

    module: nn.Module
    ctx: _Context
    batch_size: int
    input_spec: TensorSpec
    feature_spec: TensorSpec
    params: list[TensorSpec]  # local names, in program order
    buffers: list[TensorSpec]  # running_mean, running_var per BatchNorm, in order
    dropouts: list[dict] = field(default_factory=list)  # {"name", "p", "shape"}
    batchnorms: list[dict] = field(default_factory=list)  # {"name", "momentum", "eps"}
    freeze_batchnorm: bool = False

    def param_tensors(self) -> list[torch.Tensor]:
        named = dict(self.module.named_parameters())
        return [named[p.name] for p in self.params]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def prepare_head(
    head: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    *,
    freeze_batchnorm: bool = False,
    executorch: bool = False,
    optimize: bool = True,
) -> PreparedHead:
    """Copy ``head`` and rewrite BatchNorm/Dropout into explicit-state layers.

    ``executorch=True`` also rewrites layers whose ExecuTorch kernels are wrong or
    missing (max pooling, 1-D convolution) and, with ``optimize``, slow
    (convolution, linear; see :mod:`export.rewrites`). ``input_shape`` excludes the
    batch dimension. The head's own weights are not touched; the copy's parameters
    are only used as example values.
    """
    head = copy.deepcopy(head).float()
    x = torch.zeros((batch_size, *input_shape))
    # Probe the shapes reaching every dropout, in call order (the RNG order).
    seen: dict[str, list[int]] = {}
    hooks = []
    for name, m in head.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and not isinstance(m, nn.Dropout):
            raise NotImplementedError(f"{type(m).__name__} at {name!r} is not exportable (only nn.Dropout)")
        if isinstance(m, nn.Dropout):

            def record(mod, inp, out, name=name) -> None:
                seen.setdefault(name, list(inp[0].shape))

            hooks.append(m.register_forward_hook(record))
    head.eval()
    with torch.no_grad():
        out = head(x)
    for h in hooks:
        h.remove()

    ctx = _Context()
    batchnorms: list[dict] = []
    buffers: list[TensorSpec] = []
    dropouts: list[dict] = []

    def rewrite(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            full = f"{prefix}{child_name}"
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                new = ExportBatchNorm(child, ctx, len(batchnorms))
                batchnorms.append({"name": full, "momentum": new.momentum, "eps": new.eps})
                for b in ("running_mean", "running_var"):
                    buffers.append(TensorSpec(f"{full}.{b}", list(getattr(child, b).shape)))
                setattr(parent, child_name, new)
            elif executorch and isinstance(child, (nn.MaxPool1d, nn.MaxPool2d)):
                pool = _window_pool(child)
                if pool is None:
                    raise UnsupportedLayerError(
                        "aten.max_pool2d_with_indices_backward",
                        f"{type(child).__name__} at {full!r} has overlapping or padded windows; the ExecuTorch "
                        "portable kernel for its backward gives wrong gradients and only non-overlapping "
                        "pooling is rewritten",
                    )
                setattr(parent, child_name, pool)
            elif isinstance(child, nn.Dropout):
                if child.p > 0 and full in seen:
                    dropouts.append({"name": full, "p": float(child.p), "shape": seen[full]})
                    setattr(parent, child_name, MaskedDropout(ctx, len(dropouts) - 1))
                else:
                    setattr(parent, child_name, nn.Identity())
            else:
                rewrite(child, f"{full}.")

    rewrite(head, "")
    if executorch:
        rewrite_for_executorch(head, optimize=optimize)
    # Dropout masks must be drawn in call order; named_modules order is definition
    # order, which matches for the sequential block models we export.
    order = list(seen)
    if [d["name"] for d in dropouts] != [n for n in order if n in {d["name"] for d in dropouts}]:
        raise NotImplementedError("dropout layers are called in a different order than defined")
    params = [TensorSpec(n, list(p.shape), _dtype_name(p.dtype)) for n, p in head.named_parameters()]
    return PreparedHead(
        module=head,
        ctx=ctx,
        batch_size=batch_size,
        input_spec=TensorSpec("x", [batch_size, *input_shape]),
        feature_spec=TensorSpec("features", list(out.shape), _dtype_name(out.dtype)),
        params=params,
        buffers=buffers,
        dropouts=dropouts,
        batchnorms=batchnorms,
        freeze_batchnorm=freeze_batchnorm,
    )


class _Base(nn.Module):
    def __init__(self, prep: PreparedHead) -> None:
        super().__init__()
        self.head = prep.module
        self._prep = [prep]

    @property
    def prep(self) -> PreparedHead:
        return self._prep[0]

    def _split(self, rest: tuple[torch.Tensor, ...], with_params: bool):
        prep = self.prep
        i = 0
        params = {}
        if with_params:
            params = {s.name: t for s, t in zip(prep.params, rest[: len(prep.params)])}
            i = len(prep.params)
        buffers = list(rest[i : i + len(prep.buffers)])
        masks = list(rest[i + len(prep.buffers) :])
        return params, buffers, masks

    def _run(self, x, params, buffers, masks, mode, dropout: bool = True) -> torch.Tensor:
        ctx = self.prep.ctx
        ctx.dropout = dropout
        ctx.bn_mode = "running" if self.prep.freeze_batchnorm else mode
        ctx.buffers, ctx.masks, ctx.new_buffers = buffers, masks, []
        if not params:
            return self.head(x)
        with _swapped_parameters(self.head, params):
            return self.head(x)


class ForwardTrain(_Base):
    """``forward(x, *params, *buffers, *masks) -> (features, *new_buffers)``."""

    def forward(self, x: torch.Tensor, *rest: torch.Tensor):
        params, buffers, masks = self._split(rest, True)
        out = self._run(x, params, buffers, masks, "batch_update")
        return (out, *self.prep.ctx.new_buffers)


class ForwardEval(_Base):
    """``forward_eval(x, *params, *buffers) -> features`` (running statistics, no dropout)."""

    def forward(self, x: torch.Tensor, *rest: torch.Tensor):
        params, buffers, _ = self._split(rest, True)
        return self._run(x, params, buffers, [], "running", dropout=False)


class ForwardLoss(_Base):
    """``(x, g, *buffers, *masks) -> sum(head(x) * g)``; parameters are the module's own.

    Its parameter gradients are the vector-Jacobian product ``J^T g``, so exporting it
    through ``_export_forward_backward`` yields the replay backward.
    """

    def forward(self, x: torch.Tensor, g: torch.Tensor, *rest: torch.Tensor):
        _, buffers, masks = self._split(rest, False)
        return (self._run(x, {}, buffers, masks, "batch") * g).sum()


class ForwardLossFunctional(_Base):
    """``(x, g, *params, *buffers, *masks) -> sum(head(x) * g)``, for TorchScript."""

    def forward(self, x: torch.Tensor, g: torch.Tensor, *rest: torch.Tensor):
        params, buffers, masks = self._split(rest, True)
        return (self._run(x, params, buffers, masks, "batch") * g).sum()


def example_inputs(prep: PreparedHead) -> dict[str, tuple[torch.Tensor, ...]]:
    """Example arguments for each method, in the manifest's order."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(prep.input_spec.shape, generator=gen)
    g = torch.randn(prep.feature_spec.shape, generator=gen)
    params = tuple(t.detach().clone() for t in prep.param_tensors())
    buffers = []
    for spec in prep.buffers:
        buffers.append(torch.ones(spec.shape) if spec.name.endswith("running_var") else torch.zeros(spec.shape))
    masks = tuple(torch.ones(d["shape"]) for d in prep.dropouts)
    buffers = tuple(buffers)
    return {
        "forward": (x, *params, *buffers, *masks),
        "forward_eval": (x, *params, *buffers),
        "forward_backward": (x, g, *buffers, *masks),
    }
