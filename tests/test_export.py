"""Parity of the exported head programs (ExecuTorch and TorchScript) with eager PyTorch.

Export is slow (seconds per point on the CI box), so every program used here is
exported once per test session by the ``programs`` fixture; batch sizes are small.
The programs are exported from the seed-0 zoo models and loaded with the weights of
the seed-1 models, so a runtime that ignored the given weights would fail parity.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edge_sdk import zoo
from edge_sdk.runtime.loading import load_runtime
from edge_sdk.runtime.program import ShortBatchError
from export.api import export_head, write_manifest

pytestmark = pytest.mark.slow

BATCH = 4
# (model, point): digits p=4 has BatchNorm and Dropout, p=1 only BatchNorm; mnist1d p=1
# is the BatchNorm block, p=5 adds three convs and a linear; mobilenetv3 p=2 is the stem
# plus the first bottleneck (depthwise conv, three BatchNorms, hardswish), p=3 adds a
# stride-2 depthwise conv.
CASES = {
    "digits_cnn": [1, 4],
    "mnist1d_cnn": [1, 5],
    "mobilenetv3_large": [2, 3],
}
FORMATS = ["executorch", "torchscript"]


def _export_dir(root: Path, model: str, fmt: str, points: list[int], *, freeze: bool = False) -> Path:
    spec = zoo.build(model, seed=0)
    out = root / f"{model}-{fmt}{'-frozen' if freeze else ''}"
    entries = [
        export_head(
            spec.model.head(p),
            spec.input_shape,
            point=p,
            batch_size=BATCH,
            out_dir=out,
            fmt=fmt,
            name_map=spec.model.head_name_map(p),
            freeze_batchnorm=freeze,
        )
        for p in points
    ]
    write_manifest(out, entries, model=model, config_hash=spec.config_hash, fmt=fmt, batch_size=BATCH)
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def programs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("programs")
    dirs = {(m, f): _export_dir(root, m, f, pts) for m, pts in CASES.items() for f in FORMATS}
    for f in FORMATS:
        dirs[("digits_cnn-frozen", f)] = _export_dir(root, "digits_cnn", f, [4], freeze=True)
    return dirs


def _weights(model: str) -> tuple[zoo.ModelSpec, dict[str, torch.Tensor]]:
    spec = zoo.build(model, seed=1)
    return spec, {k: v.clone() for k, v in spec.model.state_dict().items()}


class EagerReference:
    """Eager head with the pipeline's semantics: the step's forward updates BatchNorm
    statistics once, the replay recomputes it (same RNG state) without touching them."""

    def __init__(self, head: nn.Module, frozen_bn: bool = False) -> None:
        self.head = head
        self.frozen_bn = frozen_bn

    def _mode(self) -> None:
        self.head.train()
        if self.frozen_bn:
            for m in self.head.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._mode()
        with torch.no_grad():
            return self.head(x)

    def replay_backward(self, x: torch.Tensor, g: torch.Tensor) -> None:
        self._mode()
        saved = {k: v.clone() for k, v in self.head.named_buffers()}
        for p in self.head.parameters():
            p.grad = None
        self.head(x).backward(g)
        with torch.no_grad():
            for k, v in self.head.named_buffers():
                v.copy_(saved[k])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def grad_rel_err(rt, ref: EagerReference) -> float:
    """Max parameter-gradient difference over the largest gradient entry of the head.

    Per tensor relative error is meaningless for gradients that are zero in exact
    arithmetic (a conv bias feeding BatchNorm), so the scale is the whole head's.
    """
    ref_grads = dict(ref.head.named_parameters())
    got = rt.named_parameters()
    assert set(got) == set(ref_grads)
    scale = max(float(p.grad.abs().max()) for p in ref_grads.values())
    return max(float((got[k].grad - ref_grads[k].grad).abs().max()) for k in ref_grads) / scale


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model,point", [(m, p) for m, pts in CASES.items() for p in pts])
def test_features_and_gradients_match_eager(programs, model, point, fmt):
    spec, weights = _weights(model)
    rt = load_runtime(fmt, programs[(model, fmt)], point, weights)
    ref = EagerReference(spec.model.head(point))
    gen = torch.Generator().manual_seed(point)
    x = torch.randn((BATCH, *spec.input_shape), generator=gen)
    state = torch.get_rng_state()
    feats = rt.forward(x)
    torch.set_rng_state(state)
    ref_feats = ref.forward(x)
    assert feats.shape == ref_feats.shape
    assert rel_err(feats, ref_feats) < 1e-5
    # running statistics were updated once, identically
    ref_buffers = dict(ref.head.named_buffers())
    for name, buf in rt.named_buffers().items():
        assert torch.allclose(buf.float(), ref_buffers[name].float(), rtol=1e-5, atol=1e-6), name
    g = torch.randn(feats.shape, generator=gen)
    torch.set_rng_state(state)
    rt.replay_backward(x, g)
    torch.set_rng_state(state)
    ref.replay_backward(x, g)
    assert grad_rel_err(rt, ref) < 1e-5
    # replay left the statistics alone
    for name, buf in rt.named_buffers().items():
        assert torch.allclose(buf.float(), ref_buffers[name].float(), rtol=1e-5, atol=1e-6), name
    # eval mode uses the running statistics and no dropout
    ref.head.eval()
    with torch.no_grad():
        assert rel_err(rt.forward(x, train=False), ref.head(x)) < 1e-5


def _train(rt, ref: EagerReference, spec: zoo.ModelSpec, point: int, steps: int) -> float:
    """Train head runtime and eager reference side by side through the same frozen tail;
    return the largest weight difference relative to the weights' scale.

    The global RNG (dropout masks) is seeded here, so the run does not depend on
    which tests ran before. Why it matters: max pooling routes the gradient to the
    window's argmax, and the program sums in another order than eager (features
    agree to ~3e-7), so when two values in a window are that close the two sides
    route one gradient entry differently and the weights part. Over 50 steps that
    happened for about 3 % of RNG states (digits p=4, found by running 340 seeds);
    a fixed state makes the test repeatable instead of flaky."""
    torch.manual_seed(0)
    tail = copy.deepcopy(spec.model.tail(point)).eval()
    for p in tail.parameters():
        p.requires_grad_(False)
    opt_rt = torch.optim.SGD(rt.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.head.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(123)

    def upstream(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = f.detach().requires_grad_(True)
        nn.functional.cross_entropy(tail(f), y).backward()
        return f.grad

    for _ in range(steps):
        x = torch.randn((BATCH, *spec.input_shape), generator=gen)
        y = torch.randint(0, spec.num_classes, (BATCH,), generator=gen)
        state = torch.get_rng_state()
        g_rt = upstream(rt.forward(x), y)
        torch.set_rng_state(state)
        g_ref = upstream(ref.forward(x), y)
        torch.set_rng_state(state)
        rt.replay_backward(x, g_rt)
        torch.set_rng_state(state)
        ref.replay_backward(x, g_ref)
        opt_rt.step()
        opt_ref.step()
    got = rt.named_parameters()
    worst = 0.0
    for name, p in ref.head.named_parameters():
        worst = max(worst, float((got[name] - p).abs().max()) / max(float(p.abs().max()), 1e-3))
    return worst


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model,point", [("digits_cnn", 4), ("mnist1d_cnn", 5)])
def test_fifty_training_steps_track_eager(programs, model, point, fmt):
    spec, weights = _weights(model)
    rt = load_runtime(fmt, programs[(model, fmt)], point, weights)
    ref = EagerReference(spec.model.head(point))
    start = {k: v.clone() for k, v in weights.items()}
    assert _train(rt, ref, spec, point, steps=50) < 1e-4
    # and the weights really moved (the test is not vacuous)
    moved = max(float((p - start[n]).abs().max()) for n, p in rt.named_parameters().items())
    assert moved > 1e-2
    ref_buffers = dict(ref.head.named_buffers())
    for name, buf in rt.named_buffers().items():
        assert torch.allclose(buf.float(), ref_buffers[name].float(), rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_frozen_batchnorm_matches_eval_mode_batchnorm_and_pads_short_batches(programs, fmt):
    spec, weights = _weights("digits_cnn")
    with torch.no_grad():  # non-trivial running statistics, so freezing is visible
        weights["blocks.0.1.running_mean"].uniform_(-0.5, 0.5)
        weights["blocks.0.1.running_var"].uniform_(0.5, 2.0)
    spec.model.load_state_dict(weights)
    rt = load_runtime(fmt, programs[("digits_cnn-frozen", fmt)], 4, weights)
    ref = EagerReference(spec.model.head(4), frozen_bn=True)
    x = torch.randn(BATCH - 1, *spec.input_shape)  # short batch: padded
    state = torch.get_rng_state()
    feats = rt.forward(x)
    torch.set_rng_state(state)
    assert feats.shape[0] == BATCH - 1
    assert rel_err(feats, ref.forward(x)) < 1e-5
    g = torch.randn(feats.shape)
    torch.set_rng_state(state)
    rt.replay_backward(x, g)
    torch.set_rng_state(state)
    ref.replay_backward(x, g)
    assert grad_rel_err(rt, ref) < 1e-5
    assert torch.equal(rt.named_buffers()["blocks.0.1.running_mean"], weights["blocks.0.1.running_mean"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_short_train_batch_with_batch_statistics_is_refused(programs, fmt):
    spec, weights = _weights("digits_cnn")
    rt = load_runtime(fmt, programs[("digits_cnn", fmt)], 1, weights)
    x = torch.randn(BATCH - 1, *spec.input_shape)
    with pytest.raises(ShortBatchError, match="drop"):
        rt.forward(x)
    assert rt.forward(x, train=False).shape[0] == BATCH - 1  # eval pads
    with pytest.raises(ValueError, match="exceeds"):
        rt.forward(torch.randn(BATCH + 1, *spec.input_shape), train=False)


def test_pte_loads_in_executorch_runtime_and_matches_manifest(programs):
    """Load the .pte with ExecuTorch's own Python runtime, no project wrapper."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    out = programs[("digits_cnn", "executorch")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "digits_cnn" and manifest["format"] == "executorch"
    assert manifest["config_hash"] == zoo.build("digits_cnn").config_hash
    assert {"torch", "executorch"} <= set(manifest["exporter"])
    entry = manifest["points"]["4"]
    module = _load_for_executorch(str(out / entry["file"]))
    assert {"forward", "forward_eval", "forward_backward"} <= set(module.method_names())
    shapes = {"x": entry["input"]["shape"], "g": entry["features"]["shape"]}
    shapes.update({p["name"]: p["shape"] for p in entry["parameters"]})
    shapes.update({b["name"]: b["shape"] for b in entry["buffers"]})
    shapes.update({f"mask:{d['name']}": d["shape"] for d in entry["dropouts"]})
    for method, sig in entry["methods"].items():
        meta = module.method_meta(method)
        assert meta.num_inputs() == len(sig["inputs"]), method
        for i, name in enumerate(sig["inputs"]):
            info = meta.input_tensor_meta(i)
            assert list(info.sizes()) == shapes[name], (method, name)
        assert meta.num_outputs() == len(sig["outputs"]), method
    assert list(module.method_meta("forward").output_tensor_meta(0).sizes()) == entry["features"]["shape"]
    # the forward method computes eager's eval features from state-dict tensors
    spec, weights = _weights("digits_cnn")
    x = torch.randn(entry["input"]["shape"])
    args = [x] + [weights[p["name"]] for p in entry["parameters"]] + [weights[b["name"]] for b in entry["buffers"]]
    (feats,) = module.run_method("forward_eval", args)
    head = spec.model.head(4).eval()
    with torch.no_grad():
        assert rel_err(feats, head(x)) < 1e-5


def test_layout_rewrites_keep_custom_backwards_in_the_joint_graph():
    """The channel-major rewrites' hand-written backwards survive ``_export_forward_backward``
    (no ``where``/``slice_scatter`` from autograd-derived ReLU/im2col backwards, no op of
    our own left for the runtime) and parameter names are unchanged."""
    from export.executorch_export import export_methods
    from export.program import prepare_head

    spec = zoo.build("digits_cnn", seed=0)
    head = spec.model.head(4)
    prep = prepare_head(head, spec.input_shape, BATCH, executorch=True)
    assert [p.name for p in prep.params] == [n for n, _ in head.named_parameters()]
    joint = export_methods(prep)["forward_backward"]
    ops = {str(n.target) for n in joint.graph.nodes if n.op == "call_function"}
    assert not any(o.startswith("splitreplay.") for o in ops), ops
    assert not ops & {"aten.where.self", "aten.slice_scatter.default", "aten.le.Scalar"}, ops
    assert not ops & {"aten.argmax.default", "aten.gather.default", "aten.scatter_add.default"}, ops


@pytest.mark.parametrize("shape,kernel", [((3, 4, 9, 8), (2, 2)), ((3, 4, 11), (2,)), ((2, 3, 6, 6), (3, 3))])
def test_window_max_pool_matches_eager_including_ties(shape, kernel):
    """The ``maximum``-based pooling routes the gradient to the first maximum of each
    window in row-major order, like eager's CPU max pooling (ReLU zeros tie often)."""
    from export.layers import WindowMaxPool
    from export.layout import CMWindowMaxPool

    torch.manual_seed(0)
    x = torch.relu(torch.randn(shape)).round()  # many ties
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    pool = nn.functional.max_pool2d if len(kernel) == 2 else nn.functional.max_pool1d
    y1, y2 = CMWindowMaxPool(WindowMaxPool(kernel))(x1), pool(x2, kernel)
    g = torch.randn(y1.shape)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(y1, y2)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize(
    "shape,kernel,stride,padding,dilation",
    [
        ((4, 3, 9, 8), (3, 3), (1, 1), (1, 1), (1, 1)),  # stride 1, "same": flipped-kernel path
        ((4, 3, 32, 32), (3, 3), (2, 2), (1, 1), (1, 1)),  # stride 2: polyphase path
        ((4, 3, 11, 10), (5, 5), (2, 2), (2, 2), (1, 1)),
        ((4, 3, 11, 10), (3, 3), (2, 2), (0, 0), (1, 1)),  # cropped
        ((4, 3, 7, 7), (3, 3), (1, 1), (2, 2), (1, 1)),  # padding wider than the kernel reach
        ((3, 2, 13, 14), (3, 3), (3, 2), (1, 1), (2, 1)),
        ((3, 2, 13, 14), (5, 3), (2, 4), (2, 0), (2, 2)),  # phases without taps
        ((4, 2, 1, 12), (1, 5), (1, 3), (0, 2), (1, 2)),  # 1-D as unit height
    ],
)
def test_depthwise_custom_backward_matches_eager(shape, kernel, stride, padding, dilation):
    """``splitreplay::depthwise_cm`` (channel-major, bmm forward, flipped-kernel or
    polyphase input gradient) against eager grouped ``conv2d``."""
    from export.kernels import _depthwise_op

    torch.manual_seed(0)
    c, n, h, w = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(c, 1, kh, kw, requires_grad=True)
    y = _depthwise_op(x, weight, [kh, kw, sh, sw, ph, pw, dh, dw, ho, wo])[0].reshape(c, n, ho, wo)
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y2 = nn.functional.conv2d(x2.transpose(0, 1), w2, stride=stride, padding=padding, dilation=dilation, groups=c)
    y2 = y2.transpose(0, 1)
    g = torch.randn(y.shape)
    y.backward(g)
    y2.backward(g)
    assert rel_err(y, y2) < 1e-5
    assert rel_err(x.grad, x2.grad) < 1e-5
    assert rel_err(weight.grad, w2.grad) < 1e-5


def test_hardswish_custom_backward_matches_eager_including_the_kinks():
    from export.kernels import FastHardswish

    x = torch.cat([torch.randn(1000) * 4, torch.tensor([-3.0, 3.0, 0.0, -6.0, 6.0])])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = FastHardswish()(x1), nn.functional.hardswish(x2)
    g = torch.randn(x.shape)
    y1.backward(g)
    y2.backward(g)
    assert rel_err(y1, y2) < 1e-6
    assert rel_err(x1.grad, x2.grad) < 1e-6


def test_mobilenet_program_uses_the_fast_kernels(programs):
    """The graph passes reach the lowered program: the 1x1 convolutions' weight
    gradients run as ``linear`` (no transpose copy), the stride-2 depthwise input
    gradient interleaves its phases with one ``pixel_shuffle``, and no ``alias``
    survives as a copy."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    data = (programs[("mobilenetv3_large", "executorch")] / "head_p3.pte").read_bytes()
    pte = deserialize_pte_binary(data)
    program = getattr(pte, "program", pte)
    joint = next(p for p in program.execution_plan if p.name == "forward_backward")
    ops = {op.name for op in joint.operators}
    assert {"aten::linear", "aten::pixel_shuffle"} <= ops
    assert "aten::alias_copy" not in ops
