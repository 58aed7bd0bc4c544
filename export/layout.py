"""Channel-major layout for the convolutional part of a head, with hand-written backwards.

Why: after :mod:`export.rewrites` turned convolutions into im2col + ``mm``, the
ExecuTorch profile of a training step was dominated by ``permute_copy`` (each conv
transposed its input to ``(C, N, H, W)`` and its output back, and autograd added
transposes of the big operands of the backward matmuls) and by the many small
elementwise/scatter ops autograd derives (BatchNorm backward, ``where`` for ReLU,
``slice_scatter`` for the im2col backward). Portable kernels are slow per call, and
``permute_copy``/``where`` are among the slowest per element.

So a run of layout-agnostic layers (convolutions, BatchNorm, ReLU, hardswish,
non-overlapping max pooling, residual blocks of them) keeps its activations as
``(C, N, *spatial)`` from the first layer to the last; the layout changes only at
the run's ends (a reshape when ``C == 1``). In that layout:

* a convolution is ``W (O, k*k*C) @ cols (k*k*C, N*Ho*Wo)`` with no transpose of
  an activation; a 1x1 convolution needs no im2col at all;
* its backward (``conv_mm`` in :mod:`export.kernels`) takes the weight gradient
  as one ``linear`` (no transpose materialised) and, for stride 1 with "same"
  padding, the input gradient as a convolution of the upstream gradient with the
  flipped kernel (im2col slices + ``mm``) instead of the ``slice_scatter`` chain of
  the im2col backward;
* BatchNorm works on a ``(C, N*H*W)`` view (per-channel broadcasts over the last
  dimension hit the fast kernel paths) with an analytic backward
  (:class:`_BatchNormTrain`: 7 full-size ops instead of ~15);
* ReLU's backward is ``g * sign(y)`` (:class:`_ReLU`) rather than ``le`` +
  ``where``, which are 5-10x slower per element in the portable kernels.

Everything computes the same function as eager PyTorch up to float summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from export.kernels import FastHardswish, _bn_op, _conv_op, _depthwise_op, relu, window_max
from export.layers import ExportBatchNorm, WindowMaxPool, running_scale_shift
from export.rewrites import SliceConv2d, rewrite_layers

# ----------------------------------------------------------------------------- layers


class CMConv(nn.Module):
    """A :class:`export.rewrites.SliceConv2d` taking and returning ``(C, N, *spatial)``."""

    def __init__(self, conv) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.one_d = conv.one_d
        self.kernel, self.stride, self.padding, self.dilation = conv.kernel, conv.stride, conv.padding, conv.dilation
        self.depthwise = conv.depthwise
        self.out_channels = conv.out_channels

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_d:
            x = x.unsqueeze(2)
        c, n, h, w = x.shape
        ho, wo = self._out_hw(h, w)
        weight = self.weight.unsqueeze(2) if self.one_d else self.weight
        geom = [*self.kernel, *self.stride, *self.padding, *self.dilation, ho, wo]
        if self.depthwise:
            y = _depthwise_op(x, weight, geom)[0].reshape(c, -1)
        else:
            y = _conv_op(x, weight, geom)[0]
        if self.bias is not None:
            y = y + self.bias.reshape(-1, 1)
        y = y.reshape(self.out_channels, n, ho, wo)
        return y.squeeze(2) if self.one_d else y


class CMBatchNorm(nn.Module):
    """:class:`export.program.ExportBatchNorm` on ``(C, N, *spatial)`` activations."""

    def __init__(self, bn: ExportBatchNorm) -> None:
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        self.eps, self.momentum, self.index = bn.eps, bn.momentum, bn.index
        self._ctx = bn._ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx[0]
        c = x.shape[0]
        x2 = x.reshape(c, -1)
        running_mean = ctx.buffers[2 * self.index]
        running_var = ctx.buffers[2 * self.index + 1]
        if ctx.bn_mode == "running":
            scale, shift = running_scale_shift(self.weight, self.bias, self.eps, running_mean, running_var)
            return (x2 * scale.reshape(c, 1) + shift.reshape(c, 1)).reshape(x.shape)
        weight = self.weight if self.weight is not None else x.new_ones(c)
        bias = self.bias if self.bias is not None else x.new_zeros(c)
        y, mean, var = _bn_op(x2, weight, bias, self.eps)[:3]
        if ctx.bn_mode == "batch_update":
            n = x2.shape[1]
            m = self.momentum
            ctx.new_buffers.append(running_mean * (1 - m) + mean.reshape(c) * m)
            ctx.new_buffers.append(running_var * (1 - m) + var.reshape(c) * (n / max(n - 1, 1) * m))
        return y.reshape(x.shape)


class CMWindowMaxPool(nn.Module):
    """:class:`export.program.WindowMaxPool` (non-overlapping windows over the trailing
    dims, any layout) as running ``maximum`` of strided slices, one dim at a time:
    first along the last dim (within each row), then along the rows, which keeps
    row-major first-wins ties. No ``argmax``/``gather``/``scatter_add``."""

    def __init__(self, pool: WindowMaxPool) -> None:
        super().__init__()
        self.kernel = tuple(pool.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        lead = x.shape[: x.dim() - len(k)]
        spatial = x.shape[x.dim() - len(k) :]
        out = [s // kk for s, kk in zip(spatial, k)]
        if any(o * kk != s for o, kk, s in zip(out, k, spatial)):
            x = x[(Ellipsis, *[slice(0, o * kk) for o, kk in zip(out, k)])]
        # last dim: (..., W) -> (..., Wo, kw, 1)
        y = window_max(x.reshape(*x.shape[:-1], out[-1], k[-1], 1), k[-1]).reshape(*x.shape[:-1], out[-1])
        if len(k) == 2:  # rows: (..., H, Wo) -> (..., Ho, kh, Wo)
            y = window_max(y.reshape(*lead, out[0], k[0], out[1]), k[0])
        return y


class FastReLU(nn.Module):
    """ReLU whose backward is ``g * sign(y)`` (any layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu(x)


def _swap01(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, ...) <-> (C, N, ...)``; a reshape (no copy) when either is 1."""
    if x.shape[0] == 1 or x.shape[1] == 1:
        return x.reshape(x.shape[1], x.shape[0], *x.shape[2:])
    return x.transpose(0, 1)


def _swap_input(module, args):
    return (_swap01(args[0]), *args[1:])


def _swap_output(module, args, out):
    return _swap01(out)


# ----------------------------------------------------------------------------- the pass
#
# Each module gets a layout at its input and output: "cm" (channel-major), "nc"
# (PyTorch's) or "any" (elementwise / pooling over the last dims, which do not care).
# Layout changes are forward hooks on the module where they happen, so parameter
# names (the manifest's) do not change.

ANY, CM, NC = "any", "cm", "nc"


def _residual_types() -> tuple[type, ...]:
    try:
        from edge_sdk.zoo.vision import InvertedResidual
    except Exception:  # noqa: BLE001 # pragma: no cover - zoo not importable
        return ()
    return (InvertedResidual,)


def _convert(m: nn.Module) -> tuple[nn.Module, str, str]:
    """``(module, in_layout, out_layout)``; ``module`` replaces ``m`` in its parent."""
    if isinstance(m, SliceConv2d) and (m.groups == 1 or m.depthwise):
        return CMConv(m), CM, CM
    if isinstance(m, ExportBatchNorm):
        return CMBatchNorm(m), CM, CM
    if isinstance(m, (nn.ReLU, FastReLU)):
        return FastReLU(), ANY, ANY
    if isinstance(m, WindowMaxPool):
        return CMWindowMaxPool(m), ANY, ANY
    if isinstance(m, (nn.Hardswish, FastHardswish)):
        return FastHardswish(), ANY, ANY
    if isinstance(m, nn.Identity):
        return m, ANY, ANY
    if isinstance(m, nn.Sequential):
        lin, lout = _convert_chain(m._modules)
        return m, lin, lout
    if isinstance(m, _residual_types()):
        block, lin, lout = _convert(m.block)
        m.block = block
        if lin in (CM, ANY) and lout in (CM, ANY):
            return m, (CM if lin == CM or lout == CM else ANY), (CM if lin == CM or lout == CM else ANY)
        _fix_ends(block, lin, lout, NC, NC)
        return m, NC, NC
    _convert_foreign(m)
    return m, NC, NC


def _convert_foreign(m: nn.Module) -> None:
    """Inside a module we do not know, only rewrite ReLUs and hardswishes (layout-free)."""
    for name, child in list(m.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(m, name, FastReLU())
        elif isinstance(child, nn.Hardswish):
            setattr(m, name, FastHardswish())
        else:
            _convert_foreign(child)


def _fix_ends(m: nn.Module, lin: str, lout: str, want_in: str, want_out: str) -> None:
    if (lin == CM and want_in == NC) or (lin == NC and want_in == CM):
        m.register_forward_pre_hook(_swap_input)
    if (lout == CM and want_out == NC) or (lout == NC and want_out == CM):
        m.register_forward_hook(_swap_output)


def _convert_chain(modules: dict) -> tuple[str, str]:
    """Convert a sequential container's children in place; a child whose input layout
    differs from the previous output gets a swapping pre-hook. Returns the chain's
    (input, output) layout."""
    cur = None  # layout flowing out of the previous child
    first_in = ANY
    for name in list(modules):
        new, lin, lout = _convert(modules[name])
        modules[name] = new
        if lin != ANY:
            if cur is None or cur == ANY:
                if first_in == ANY:
                    first_in = lin
            elif cur != lin:
                new.register_forward_pre_hook(_swap_input)
        if lout != ANY:
            cur = lout
        elif cur is None:
            cur = ANY
    return first_in, (cur or ANY)


def to_channel_major(head: nn.Module) -> nn.Module:
    """Rewrite ``head`` in place so runs of layers keep channel-major activations.

    The head's input and output stay ``(N, C, ...)``.
    """
    if isinstance(head, nn.Sequential):
        chain = head._modules
    elif isinstance(getattr(head, "blocks", None), nn.ModuleDict):
        chain = head.blocks._modules  # edge_sdk.blocks.BlockSlice: blocks run in order
    else:
        return head
    if not chain:
        return head
    lin, lout = _convert_chain(chain)
    names = list(chain)
    if lin == CM:
        chain[names[0]].register_forward_pre_hook(_swap_input)
    if lout == CM:
        chain[names[-1]].register_forward_hook(_swap_output)
    return head


def rewrite_for_executorch(module: nn.Module, *, optimize: bool = True) -> nn.Module:
    """Replace layers in place (see the module docstring); returns ``module``.

    ``optimize=False`` only does what correctness needs (``Conv1d``).
    """
    rewrite_layers(module, optimize)
    if optimize:
        to_channel_major(module)
    return module
