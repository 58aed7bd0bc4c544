"""Layer rewrites that route an ExecuTorch program's work to fast kernels.

Why: in ExecuTorch 1.5.1's Python runtime the portable ``convolution`` and
``convolution_backward`` kernels are naive loops (measured 130-250x slower than
eager PyTorch on a 3x3 conv), ``convolution_backward`` only handles 2-D, and
``addmm`` is ~60x slower, while ``mm``/``bmm`` have an optimized kernel (~3-7x) and
elementwise/copy kernels are ~3-5x. So before lowering, each layer is rewritten
into ops that have good kernels; autograd (``_export_forward_backward``) then
derives a backward made of the same kinds of ops:

* ``Linear`` -> ``mm`` + ``add`` (no ``addmm``);
* ``Conv1d``/``Conv2d`` with ``groups=1`` -> im2col by strided slices + ``mm``.
  The backward becomes ``mm`` (weight and input gradients) plus slice-scatters;
* depthwise ``Conv2d`` (``groups == in == out``) -> ``k*k`` multiply-adds of
  shifted slices (no matmul applies);
* ``Conv1d`` is always rewritten (2-D via a unit height) because the portable
  ``convolution_backward`` rejects 1-D.

The rewritten modules compute the same function up to float summation order
(parity tests hold them to 1e-5 relative).
"""

from __future__ import annotations

import torch
from torch import nn

from export.kernels import _pair, _zero_pad, linear


class MatmulLinear(nn.Module):
    """``x @ W^T + b`` as ``mm`` + ``add`` (ExecuTorch's ``addmm`` is slow)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.weight = lin.weight
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = linear(x.reshape(-1, shape[-1]), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


class SliceConv2d(nn.Module):
    """2-D convolution as strided slices (im2col) + ``mm``, or multiply-adds if depthwise.

    Layout: the input is transposed once to ``(C, N, H, W)`` so that stacking the
    ``kh*kw`` shifted slices yields the column matrix ``(kh*kw*C, N*Ho*Wo)`` without a
    further copy; the (small) weight is permuted to match, the product is
    ``(O, N*Ho*Wo)`` and one transpose restores ``(N, O, Ho, Wo)``.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__()
        self.one_d = isinstance(conv, nn.Conv1d)
        self.weight = conv.weight
        self.bias = conv.bias
        if self.one_d:
            self.kernel = (1, conv.kernel_size[0])
            self.stride = (1, conv.stride[0])
            self.padding = (0, conv.padding[0]) if not isinstance(conv.padding, str) else conv.padding
            self.dilation = (1, conv.dilation[0])
        else:
            self.kernel, self.stride = _pair(conv.kernel_size), _pair(conv.stride)
            self.padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
            self.dilation = _pair(conv.dilation)
        if isinstance(self.padding, str):
            if self.padding == "valid":
                self.padding = (0, 0)
            else:  # "same" with stride 1
                self.padding = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel))
                if any(d * (k - 1) % 2 for d, k in zip(self.dilation, self.kernel)):
                    raise NotImplementedError("asymmetric 'same' padding")
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={conv.padding_mode!r}")
        self.groups = conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels
        if self.groups > 1 and not self.depthwise:
            raise NotImplementedError("grouped convolution other than depthwise")

    def _slices(self, x: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        h, w = x.shape[-2:]
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        x = _zero_pad(x, ph, pw)
        out = []
        for i in range(kh):
            for j in range(kw):
                out.append(x[..., i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw])
        return out, ho, wo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_d:
            x = x.unsqueeze(2)
        n = x.shape[0]
        kh, kw = self.kernel
        if self.depthwise:
            slices, ho, wo = self._slices(x)
            w = self.weight.reshape(self.out_channels, kh * kw)
            y = slices[0] * w[:, 0].reshape(1, -1, 1, 1)
            for t in range(1, kh * kw):
                y = y + slices[t] * w[:, t].reshape(1, -1, 1, 1)
            if self.bias is not None:
                y = y + self.bias.reshape(1, -1, 1, 1)
        else:
            xt = x.transpose(0, 1)  # (C, N, H, W)
            slices, ho, wo = self._slices(xt)
            c = self.in_channels
            if len(slices) == 1:
                cols = slices[0].reshape(c, n * ho * wo)
            else:
                cols = torch.stack(slices, 0).reshape(kh * kw * c, n * ho * wo)
            weight = self.weight.unsqueeze(2) if self.one_d else self.weight
            w = weight.permute(0, 2, 3, 1).reshape(self.out_channels, kh * kw * c)
            y = torch.mm(w, cols)
            if self.bias is not None:
                y = y + self.bias.reshape(-1, 1)
            y = y.reshape(self.out_channels, n, ho, wo).transpose(0, 1)
        if self.one_d:
            y = y.squeeze(2)
        return y


def rewrite_layers(module: nn.Module, optimize: bool) -> None:
    """Replace layers in place by their fast-kernel forms (see the module docstring);
    ``optimize=False`` only does what correctness needs (``Conv1d``)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv1d):
            setattr(module, name, SliceConv2d(child))
        elif optimize and isinstance(child, nn.Conv2d):
            try:
                setattr(module, name, SliceConv2d(child))
            except NotImplementedError:
                pass  # keep the (slow but correct) portable convolution
        elif optimize and isinstance(child, nn.Linear):
            setattr(module, name, MatmulLinear(child))
        else:
            rewrite_layers(child, optimize)
