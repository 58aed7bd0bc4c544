"""Export-ready layer modules: state made explicit, pooling made exportable.

`export.program.prepare_head` swaps the eager head's BatchNorm, Dropout and
max-pooling layers for these (see its docstring for why each state becomes a
program input or output); `export.layout` then converts runs of them to the
channel-major layout.
"""

from __future__ import annotations

import torch
from torch import nn


class _Context:
    """Side channel through which the wrappers feed state into the rewritten layers."""

    def __init__(self) -> None:
        self.bn_mode = "batch"  # "batch" | "batch_update" | "running"
        self.buffers: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.new_buffers: list[torch.Tensor] = []
        self.dropout = True


def running_scale_shift(
    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, running_mean: torch.Tensor, running_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-statistics BatchNorm as one per-channel scale and shift, folded
    before the activation is touched (the full-size work is one multiply, one add)."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


class ExportBatchNorm(nn.Module):
    """BatchNorm written in elementary ops, state passed through :class:`_Context`."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, ctx: _Context, index: int) -> None:
        super().__init__()
        if bn.momentum is None:
            raise NotImplementedError("BatchNorm with momentum=None (cumulative average) is not exportable")
        if not bn.track_running_stats:
            raise NotImplementedError("BatchNorm without running statistics is not exportable")
        self.weight = bn.weight
        self.bias = bn.bias
        self.eps = float(bn.eps)
        self.momentum = float(bn.momentum)
        self._ctx = [ctx]  # a list so nn.Module does not register it
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx[0]
        running_mean = ctx.buffers[2 * self.index]
        running_var = ctx.buffers[2 * self.index + 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Per-channel scale/shift are folded before touching the activation, so the
        # full-size work (and its backward) is one subtract, one multiply, one add.
        if ctx.bn_mode == "running":
            scale, shift = running_scale_shift(self.weight, self.bias, self.eps, running_mean, running_var)
            return x * scale.reshape(shape) + shift.reshape(shape)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        centred = x - mean.reshape(shape)
        var = (centred * centred).mean(dim=dims)
        if ctx.bn_mode == "batch_update":
            n = x.numel() // x.shape[1]
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            ctx.new_buffers.append(running_mean * (1 - m) + mean.detach() * m)
            ctx.new_buffers.append(running_var * (1 - m) + unbiased.detach() * m)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        y = centred * scale.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y


class MaskedDropout(nn.Module):
    """Dropout whose (already scaled) mask is a program input."""

    def __init__(self, ctx: _Context, index: int) -> None:
        super().__init__()
        self._ctx = [ctx]
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx[0]
        return x * ctx.masks[self.index] if ctx.dropout else x


class WindowMaxPool(nn.Module):
    """Non-overlapping max pooling written as reshape + argmax + gather.

    Why: ExecuTorch 1.5.1's portable ``max_pool2d_with_indices_backward`` returns
    wrong gradients in the joint program (the parity tests caught it), and 1-D
    pooling lowers to the same kernel. With ``argmax`` + ``gather`` the backward is
    a ``scatter_add`` into zeros. ``argmax`` picks the first maximum in row-major
    window order, the element eager's CPU kernel routes the gradient to, so ties
    (ReLU zeros) behave the same.
    """

    def __init__(self, kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        spatial = x.shape[2:]
        out = [n // kk for n, kk in zip(spatial, k)]
        x = x[(slice(None), slice(None), *[slice(0, o * kk) for o, kk in zip(out, k)])]
        if len(k) == 1:
            w = x.reshape(x.shape[0], x.shape[1], out[0], k[0])
        else:
            w = x.reshape(x.shape[0], x.shape[1], out[0], k[0], out[1], k[1]).permute(0, 1, 2, 4, 3, 5)
            w = w.reshape(x.shape[0], x.shape[1], out[0], out[1], k[0] * k[1])
        idx = w.argmax(dim=-1, keepdim=True)
        return w.gather(-1, idx).squeeze(-1)


def _window_pool(m: nn.Module) -> WindowMaxPool | None:
    """A :class:`WindowMaxPool` equal to ``m``, or None if ``m`` has overlapping windows."""
    dims = 1 if isinstance(m, nn.MaxPool1d) else 2
    as_tuple = lambda v: (v,) * dims if isinstance(v, int) else tuple(v)
    kernel = as_tuple(m.kernel_size)
    stride = as_tuple(m.stride if m.stride is not None else m.kernel_size)
    if stride != kernel or any(as_tuple(m.padding)) or any(d != 1 for d in as_tuple(m.dilation)):
        return None
    if m.ceil_mode or m.return_indices:
        return None
    return WindowMaxPool(kernel)
