"""Custom operators with hand-written backwards: the kernels the export rewrites use.

Why: ExecuTorch's portable kernels are slow per call, and some are slow per element
(``permute_copy``, ``where``, the im2col backward's ``slice_scatter`` chain). Each
operator here is registered in the ``splitreplay`` library with its ATen
implementation and an autograd backward written out in ops that have good kernels:

* ``conv_mm`` (:class:`_ConvMM`): channel-major convolution as ``W2 @ im2col(x)``;
* ``depthwise_cm`` (:class:`_Depthwise`): depthwise convolution as tap
  multiply-adds, its input gradient per stride phase;
* ``bn_train`` (:class:`_BatchNormTrain`): BatchNorm on a ``(C, M)`` view, analytic
  backward (7 full-size ops instead of ~15);
* ``relu`` (:class:`_ReLU`): backward ``g * sign(y)`` instead of ``le`` + ``where``;
* ``hardswish``, ``linear_mm`` (``a @ b.T`` as one ``linear``), window max pooling.

Layer modules (`export.rewrites`, `export.layout`) call these; nothing here knows
about layers or layouts. Everything computes the same function as eager PyTorch up
to float summation order.
"""

from __future__ import annotations

import torch
from torch import nn


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _zero_pad(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Zero padding of the last two dims by concatenation.

    ``F.pad``'s backward is ``constant_pad_nd`` with negative padding, which the
    portable kernel rejects; ``cat``'s backward is slicing.
    """
    if ph:
        z = x.new_zeros((*x.shape[:-2], ph, x.shape[-1]))
        x = torch.cat([z, x, z], dim=-2)
    if pw:
        z = x.new_zeros((*x.shape[:-1], pw))
        x = torch.cat([z, x, z], dim=-1)
    return x


# ----------------------------------------------------------------------------- autograd
#
# Why custom operators and not plain ``torch.autograd.Function``s: ``torch.export``
# inlines an autograd.Function's forward, and ``_export_forward_backward`` then
# differentiates the inlined ATen ops, so a hand-written backward would be lost.
# An operator of our own survives the first export as one node; when the joint
# graph is traced, autograd runs its registered backward (traced into ATen ops) and,
# below autograd, the operator is decomposed into its ATen implementation (the
# Python-dispatcher CompositeImplicitAutograd kernel, which the export's
# decomposition table picks up). The lowered program only holds ATen ops.

_LIB = torch.library.Library("splitreplay", "DEF")


def _register(name: str, schema: str, impl, function: type[torch.autograd.Function]):
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    _LIB.impl(name, impl, "Meta")
    _LIB.impl(name, lambda *args: function.apply(*args), "Autograd")
    op = getattr(torch.ops.splitreplay, name).default
    op.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(impl)
    return op


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _relu_impl(x):
    return torch.relu(x)


class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = _below_autograd(_relu_op, x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * torch.sign(y)  # y >= 0: sign is the 0/1 mask


_relu_op = _register("relu", "(Tensor x) -> Tensor", _relu_impl, _ReLU)


def relu(x: torch.Tensor) -> torch.Tensor:
    return _relu_op(x)


def _hardswish_impl(x):
    """``(y, h)`` with ``h = hardtanh(x + 3, 0, 6)``, ``y = x * h / 6``."""
    h = torch.nn.functional.hardtanh(x + 3.0, 0.0, 6.0)
    return x * h / 6.0, h


class _Hardswish(torch.autograd.Function):
    """``hardtanh`` instead of ``clamp`` (portable ``clamp`` is ~4x slower), and a
    backward without ``lt``/``le``/``where``: with ``m = sign(h * (6 - h))`` (1 on the
    open interval ``(-3, 3)``, else 0) the derivative is ``(h + x * m) / 6``: ``x/3 + 1/2``
    inside, 1 from 3 up, 0 from -3 down, as eager's ``hardswish_backward``."""

    @staticmethod
    def forward(ctx, x):
        y, h = _below_autograd(_hardswish_op, x)
        ctx.save_for_backward(x, h)
        ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, g, _dh):
        x, h = ctx.saved_tensors
        m = torch.sign(h * (6.0 - h))
        return g * ((h + x * m) * (1.0 / 6.0))


_hardswish_op = _register("hardswish", "(Tensor x) -> (Tensor, Tensor)", _hardswish_impl, _Hardswish)


class FastHardswish(nn.Module):
    """Hardswish with the custom backward of :class:`_Hardswish` (any layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _hardswish_op(x)[0]


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` as ``aten::linear``, which ExecuTorch runs without materialising
    a transpose (``mm`` needs both operands contiguous: a ``permute_copy`` of the
    smaller one, at ~8 ns per element in the portable kernel). Decomposition breaks
    it up again; ``export.graph_passes.mm_transposed_to_linear`` restores it."""
    return torch.nn.functional.linear(a, b)


def _tap_slices(x: torch.Tensor, kernel, stride, dilation, out_hw) -> list[torch.Tensor]:
    """The ``kh*kw`` shifted (strided) windows of the padded ``x (..., H, W)``, tap-major.

    Each kernel row's slice along H is taken once and shared by that row's taps, and a
    slice spanning a whole dim is skipped: every slice is a copy in ExecuTorch.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho, wo = out_hw

    def cut(t, dim, start, n, step):
        stop = start + step * (n - 1) + 1
        if start == 0 and step == 1 and stop == t.shape[dim]:
            return t
        return (
            t.narrow(dim, start, stop - start) if step == 1 else t[(slice(None),) * (dim % t.dim()) + (slice(start, stop, step),)]
        )

    if sh > 1 or sw > 1:
        return _phase_tap_slices(x, kernel, stride, dilation, out_hw, cut)
    taps = []
    for i in range(kh):
        row = cut(x, -2, i * dh, ho, sh)
        taps.extend(cut(row, -1, j * dw, wo, sw) for j in range(kw))
    return taps


def _phase_tap_slices(x: torch.Tensor, kernel, stride, dilation, out_hw, cut) -> list[torch.Tensor]:
    """Strided taps via the input's ``sh*sw`` phases: tap ``(i, j)`` is the
    contiguous window at ``(i*dh // sh, j*dw // sw)`` of phase ``(i*dh % sh, j*dw % sw)``.

    Why: a strided slice is an element-by-element gather in ExecuTorch (~2.5 ns per
    element); splitting the input into phases once gathers each input element once
    (W first, the expensive direction, then rows), and the ``kh*kw`` taps become
    row-contiguous copies. Measured on MobileNetV3's 3x3 stride-2 depthwise layer
    (64 x 32 x 34 x 34 padded input) with the ``bmm``: 10.6 vs 14.8 ms
    (``python bench/export_ops.py --kernels``)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho, wo = out_hw
    cols = {s: x[..., s::sw] if sw > 1 else x for s in {j * dw % sw for j in range(kw)}}
    phases = {(r, s): cols[s][..., r::sh, :] if sh > 1 else cols[s] for r in {i * dh % sh for i in range(kh)} for s in cols}
    taps = []
    for i in range(kh):
        for j in range(kw):
            ph = phases[(i * dh % sh, j * dw % sw)]
            taps.append(cut(cut(ph, -2, i * dh // sh, ho, 1), -1, j * dw // sw, wo, 1))
    return taps


def _im2col(x: torch.Tensor, kernel, stride, padding, dilation, out_hw, reverse: bool = False) -> torch.Tensor:
    """``(C, N, H, W)`` -> ``(kh*kw*C, N*Ho*Wo)`` (rows ordered tap-major; taps in
    reverse order if ``reverse``, which pairs with a flipped kernel at no cost)."""
    ho, wo = out_hw
    x = _zero_pad(x, *padding)
    taps = _tap_slices(x, kernel, stride, dilation, out_hw)
    if reverse:
        taps.reverse()
    c = x.shape[0]
    m = x.shape[1] * ho * wo
    if len(taps) == 1:
        return taps[0].reshape(c, m)
    return torch.cat(taps, 0).reshape(len(taps) * c, m)


def _geometry(geom):
    kh, kw, sh, sw, ph, pw, dh, dw, ho, wo = geom
    return (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo)


def _conv_impl(x, weight, geom):
    """``(y (O, N*Ho*Wo), cols)`` for ``x (C, N, H, W)``."""
    kernel = _geometry(geom)[0]
    o, c = weight.shape[0], weight.shape[1]
    k = kernel[0] * kernel[1]
    cols = _im2col(x, *_geometry(geom))
    w2 = weight.permute(0, 2, 3, 1).reshape(o, k * c) if k > 1 else weight.reshape(o, c)
    return w2 @ cols, cols


def _forward_saving_cols(ctx, op, x, weight, geom):
    """Forward of a convolution op that returns ``(y, cols)``; keeps what both
    hand-written backwards need (the columns, the weight, the geometry)."""
    y, cols = _below_autograd(op, x, weight, geom)
    ctx.save_for_backward(cols, weight)
    ctx.geom = list(geom)
    ctx.x_shape = x.shape
    ctx.mark_non_differentiable(cols)
    return y, cols


class _ConvMM(torch.autograd.Function):
    """Convolution as ``W2 @ im2col(x)`` in channel-major layout, hand-written backward:
    the weight gradient is ``dy @ cols.T`` as one ``linear`` (no transpose is
    materialised, see `_mm_t`); a 1x1 stride-1 input gradient is one matmul; for
    stride 1 and "same" padding it is the convolution of ``dy`` with the flipped
    kernel (taps read in reverse); otherwise ``col2im`` of ``W2.T @ dy``."""

    @staticmethod
    def forward(ctx, x, weight, geom):
        return _forward_saving_cols(ctx, _conv_op, x, weight, geom)

    @staticmethod
    def backward(ctx, dy, _dcols):
        cols, weight = ctx.saved_tensors
        kernel, stride, padding, dilation, (ho, wo) = _geometry(ctx.geom)
        o, c, kh, kw = weight.shape
        dw2 = _mm_t(dy, cols)  # (O, K*C)
        if kh * kw > 1:
            dweight = dw2.reshape(o, kh, kw, c).permute(0, 3, 1, 2)
        else:
            dweight = dw2.reshape(weight.shape)
        dx = None
        if ctx.needs_input_grad[0]:  # not for the head's first layer
            n = ctx.x_shape[1]
            same = tuple(padding) == tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
            if kh * kw == 1 and stride == (1, 1) and padding == (0, 0):
                dx = (weight.reshape(o, c).t() @ dy).reshape(ctx.x_shape)
            elif stride == (1, 1) and same and all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, kernel)):
                # transposed convolution = convolution with the flipped kernel; the flip
                # is done by taking dy's taps in reverse order (the portable ``flip``
                # kernel is slow)
                wf = weight.permute(1, 2, 3, 0).reshape(c, kh * kw * o)
                dcols = _im2col(dy.reshape(o, n, ho, wo), kernel, stride, padding, dilation, (ho, wo), reverse=True)
                dx = (wf @ dcols).reshape(ctx.x_shape)
            else:
                w2 = weight.permute(0, 2, 3, 1).reshape(o, kh * kw * c)
                dx = _col2im(w2.t() @ dy, ctx.x_shape, _geometry(ctx.geom))
        return dx, dweight, None


def _col2im(dcols, x_shape, geometry):
    """Adjoint of :func:`_im2col`, by differentiating it (the generic, slower path)."""
    with torch.enable_grad():
        x = torch.zeros(x_shape, dtype=dcols.dtype, requires_grad=True)
        cols = _im2col(x, *geometry)
        (dx,) = torch.autograd.grad(cols, x, dcols)
    return dx


_conv_op = _register("conv_mm", "(Tensor x, Tensor weight, int[] geom) -> (Tensor, Tensor)", _conv_impl, _ConvMM)


def _taps_ck(x: torch.Tensor, kernel, stride, padding, dilation, out_hw, reverse: bool = False) -> torch.Tensor:
    """``(C, N, H, W)`` -> ``(C, kh*kw, N*Ho*Wo)``: per channel, the taps as rows (for ``bmm``)."""
    ph, pw = padding
    ho, wo = out_hw
    x = _pad_or_crop(_pad_or_crop(x, 2, ph, ph), 3, pw, pw)
    c, m = x.shape[0], x.shape[1] * ho * wo
    taps = _tap_slices(x, kernel, stride, dilation, out_hw)
    if reverse:
        taps.reverse()
    return torch.stack(taps, 1).reshape(c, len(taps), m)  # stack: no copy of a strided tap before the cat


def _depthwise_impl(x, weight, geom):
    """``(y (C, 1, N*Ho*Wo), cols (C, k, N*Ho*Wo))`` for ``x (C, N, H, W)``, ``weight (C, 1, kh, kw)``:
    one ``bmm`` of the per-channel kernels ``(C, 1, k)`` with the per-channel taps."""
    c = x.shape[0]
    cols = _taps_ck(x, *_geometry(geom))
    return torch.bmm(weight.reshape(c, 1, -1), cols), cols


def _pad_or_crop(x: torch.Tensor, dim: int, left: int, right: int) -> torch.Tensor:
    """Zero-pad (``cat``) or crop (``right < 0``) dim ``dim`` of ``x``."""
    if right < 0:
        x = x.narrow(dim, 0, x.shape[dim] + right)
        right = 0
    parts = []
    if left:
        parts.append(x.new_zeros((*x.shape[:dim], left, *x.shape[dim + 1 :])))
    parts.append(x)
    if right:
        parts.append(x.new_zeros((*x.shape[:dim], right, *x.shape[dim + 1 :])))
    return torch.cat(parts, dim) if len(parts) > 1 else x


def _phase_taps(k: int, s: int, d: int, r: int) -> list[tuple[int, int]]:
    """Taps ``t`` of a ``k``-tap kernel (stride ``s``, dilation ``d``) that reach padded
    input positions ``s*u + r``, with their output offsets ``e``: ``dx[s*u + r] += dy[u - e] * w[t]``."""
    return [(t, (t * d - r) // s) for t in range(k) if (t * d - r) % s == 0]


def _depthwise_input_grad_polyphase(dy, weight, x_shape, geometry):
    """Input gradient of a strided depthwise convolution, one output phase at a time.

    The padded input position ``q = s*u + r`` receives ``dy[u - e_t] * w[t]`` from the
    taps ``t`` with ``t*d = s*e_t + r``; per phase ``(rh, rw)`` that is a small
    depthwise convolution (shifted slices of the zero-padded ``dy`` + ``bmm``), and the
    phases are interleaved by ``stack`` + reshape. Same work as the forward, where
    zero-dilating ``dy`` first would do ``s*s`` times as much."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = geometry
    c, n, h, w = x_shape
    wk = weight.reshape(c, kh, kw)
    uh, uw = -(-(h + 2 * ph) // sh), -(-(w + 2 * pw) // sw)
    phases_h = [_phase_taps(kh, sh, dh, r) for r in range(sh)]
    phases_w = [_phase_taps(kw, sw, dw, r) for r in range(sw)]
    lh = max([e for ph_ in phases_h for _, e in ph_], default=0)
    lw = max([e for pw_ in phases_w for _, e in pw_], default=0)
    dyp = _pad_or_crop(_pad_or_crop(dy, 2, lh, max(0, uh - ho)), 3, lw, max(0, uw - wo))
    rows = []
    for taps_h in phases_h:
        cols = []
        for taps_w in phases_w:
            taps = [(th, eh, tw, ew) for th, eh in taps_h for tw, ew in taps_w]
            if not taps:
                cols.append(dy.new_zeros((c, n, uh, uw)))
                continue
            sl = [dyp[:, :, lh - eh : lh - eh + uh, lw - ew : lw - ew + uw] for _, eh, _, ew in taps]
            wsel = torch.stack([wk[:, th, tw] for th, _, tw, _ in taps], 1).reshape(c, 1, len(taps))
            cols.append(torch.bmm(wsel, torch.stack(sl, 1).reshape(c, len(taps), n * uh * uw)).reshape(c, n, uh, uw))
        rows.append(cols)
    if sh == sw:
        # one pass: phase (rh, rw) is channel rh*s + rw of pixel_shuffle's input; in
        # ExecuTorch 14.0 vs 15.9 ms by stacks (bench/export_ops.py --kernels)
        phases = torch.stack([p for r in rows for p in r], 2).reshape(c * n, sh * sw, uh, uw)
        full = torch.nn.functional.pixel_shuffle(phases, sh).reshape(c, n, uh * sh, uw * sw)
    else:
        rows = [torch.stack(r, -1).reshape(c, n, uh, uw * sw) if sw > 1 else r[0] for r in rows]
        full = torch.stack(rows, -2).reshape(c, n, uh * sh, uw * sw) if sh > 1 else rows[0]
    return full[:, :, ph : ph + h, pw : pw + w]


class _Depthwise(torch.autograd.Function):
    """Depthwise convolution (channel-major) with a hand-written backward: the weight
    gradient is one batched matmul over the saved columns; at stride 1 the input
    gradient is a depthwise convolution of ``dy`` (padded or cropped) with the
    flipped kernel; at other strides it is computed per stride phase
    (`_depthwise_input_grad_polyphase`: no zero-dilated copy of ``dy``), instead of
    autograd's ``slice_scatter`` chain."""

    @staticmethod
    def forward(ctx, x, weight, geom):
        return _forward_saving_cols(ctx, _depthwise_op, x, weight, geom)

    @staticmethod
    def backward(ctx, dy, _dcols):
        cols, weight = ctx.saved_tensors
        kernel, stride, padding, dilation, (ho, wo) = _geometry(ctx.geom)
        c, _, kh, kw = weight.shape
        k = kh * kw
        dweight = torch.bmm(cols, dy.reshape(c, -1, 1)).reshape(weight.shape)
        dx = None
        if ctx.needs_input_grad[0]:
            _, n, h, w = ctx.x_shape
            if stride == (1, 1) and all(d * (kk - 1) >= p for d, kk, p in zip(dilation, kernel, padding)):
                # stride-1 depthwise convolution of dy with the flipped kernel
                d = dy.reshape(c, n, ho, wo)
                for dim, size, dd, kk, p in ((2, h, dilation[0], kh, padding[0]), (3, w, dilation[1], kw, padding[1])):
                    lft = dd * (kk - 1) - p
                    d = _pad_or_crop(d, dim, lft, size + dd * (kk - 1) - d.shape[dim] - lft)
                dcols = _taps_ck(d, kernel, (1, 1), (0, 0), dilation, (h, w), reverse=True)
                dx = torch.bmm(weight.reshape(c, 1, k), dcols).reshape(ctx.x_shape)
            else:
                dx = _depthwise_input_grad_polyphase(dy.reshape(c, n, ho, wo), weight, ctx.x_shape, _geometry(ctx.geom))
        return dx, dweight, None


_depthwise_op = _register(
    "depthwise_cm",
    "(Tensor x, Tensor weight, int[] geom) -> (Tensor, Tensor)",
    _depthwise_impl,
    _Depthwise,
)


def _bn_impl(x, weight, bias, eps):
    """Batch-statistics BatchNorm of ``x (C, M)``: ``(y, mean, var, xc, rstd)``."""
    m = x.shape[1]
    mean = x.sum(1, keepdim=True) * (1.0 / m)
    xc = x - mean
    var = (xc * xc).sum(1, keepdim=True) * (1.0 / m)
    rstd = torch.rsqrt(var + eps)
    y = xc * (rstd * weight.reshape(-1, 1)) + bias.reshape(-1, 1)
    return y, mean, var, xc, rstd


class _BatchNormTrain(torch.autograd.Function):
    """Analytic backward: 7 full-size ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, var, xc, rstd = _below_autograd(_bn_op, x, weight, bias, eps)
        ctx.save_for_backward(xc, rstd, weight)
        ctx.mark_non_differentiable(mean, var, xc, rstd)
        return y, mean, var, xc, rstd

    @staticmethod
    def backward(ctx, dy, *_):
        xc, rstd, weight = ctx.saved_tensors
        m = xc.shape[1]
        scale = rstd * weight.reshape(-1, 1)
        dbias = dy.sum(1, keepdim=True)
        s2 = (dy * xc).sum(1, keepdim=True)  # dweight / rstd
        dweight = s2 * rstd
        k2 = scale * s2 * rstd * rstd * (-1.0 / m)
        k3 = scale * dbias * (-1.0 / m)
        dx = dy * scale + (xc * k2 + k3)
        return dx, dweight.reshape(-1), dbias.reshape(-1), None


_bn_op = _register(
    "batch_norm_cm",
    "(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _bn_impl,
    _BatchNormTrain,
)


def _linear_impl(x, weight):
    """``x (N, I) @ weight.T``, transposing ``x`` and the result if they are smaller than ``weight``."""
    n, i = x.shape
    o = weight.shape[0]
    if n * (i + o) < o * i:
        return (weight @ x.t()).t()
    return x @ weight.t()


class _Linear(torch.autograd.Function):
    """Backward ``dW = dy^T @ x`` (transposes the small ``dy``), ``dx = dy @ W`` (none)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _below_autograd(_linear_op, x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        return dx, dy.t() @ x


_linear_op = _register("linear_mm", "(Tensor x, Tensor weight) -> Tensor", _linear_impl, _Linear)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _linear_op(x, weight)


def _window_max_impl(x, k):
    """``x (..., k, I)`` -> ``(y (..., I), x_0, ..., x_{k-1}, m_1, ..., m_{k-2})``: the max
    over dim -2 by a running ``maximum`` of the ``k`` slices, plus what the backward needs."""
    parts = [x.select(-2, i) for i in range(k)]
    runs = []
    m = parts[0]
    for i in range(1, k):
        m = torch.maximum(m, parts[i])
        runs.append(m)
    return (m, *parts, *runs[:-1])


class _WindowMax(torch.autograd.Function):
    """Backward without argmax/scatter: slice ``i`` gets the gradient where it is
    strictly above the running max of slices ``0..i-1`` and no later slice is, so the
    first maximum wins ties, like eager's CPU max pooling. The masks are
    ``sign(relu(x_i - m_{i-1}))`` (0/1), the slices' gradients are stacked back."""

    @staticmethod
    def forward(ctx, x, k):
        out = _below_autograd(_window_max_op(k), x, k)
        ctx.k = k
        ctx.save_for_backward(*out[1:])
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, g, *_):
        k = ctx.k
        saved = ctx.saved_tensors
        parts, runs = saved[:k], (saved[0], *saved[k:])  # runs[i-1]: max of slices 0..i-1
        grads = [None] * k
        rest = g
        for i in range(k - 1, 0, -1):
            grads[i] = rest * torch.sign(torch.relu(parts[i] - runs[i - 1]))
            rest = rest - grads[i]
        grads[0] = rest
        return torch.stack(grads, -2), None


_WINDOW_MAX_OPS: dict[int, object] = {}


def _window_max_op(k: int):
    """The ``splitreplay::window_max{k}`` operator (registered on first use)."""
    if k not in _WINDOW_MAX_OPS:
        outs = ", ".join(["Tensor"] * (2 * k - 1))
        _WINDOW_MAX_OPS[k] = _register(f"window_max{k}", f"(Tensor x, int k) -> ({outs})", _window_max_impl, _WindowMax)
    return _WINDOW_MAX_OPS[k]


def window_max(x: torch.Tensor, k: int) -> torch.Tensor:
    """Max over dim -2 (of size ``k``) of ``x (..., k, I)``."""
    if k == 1:
        return x.squeeze(-2)
    return _window_max_op(k)(x, k)[0]
