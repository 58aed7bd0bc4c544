"""The edge pipeline's rules, checked without sockets (sans-I/O).

* K = 0 with the lossless codec is exactly centralized training.
* K > 0 applies the feature-replay rule (recompute at current weights).
* Error feedback applies g - E*g*g.
* Every gradient is applied exactly once; duplicates/unknown steps are refused.
* Replay reproduces dropout masks and leaves BatchNorm statistics alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cloud_backend.session import CloudSession, SessionConfig
from edge_sdk import zoo
from edge_sdk.hello import hello_frame
from edge_sdk.optim import OptimizerConfig
from edge_sdk.pipeline import EdgePipeline, StepAccountingError
from edge_sdk.runtime.eager import EagerRuntime
from schemas import codecs
from schemas import frames as fr
from schemas.errors import ErrorCode


def wire(frame):
    """Send a frame through the real encoder/decoder, as the link would."""
    return fr.decode(fr.encode(fr.Envelope(frame=frame))).frame


def make_split(model_name: str, point: int, *, staleness: int, codec: str, opt: OptimizerConfig, seed: int = 0):
    spec = zoo.build(model_name, seed=seed)
    runtime = EagerRuntime(spec.model.head(point), name_map=spec.model.head_name_map(point))
    pipe = EdgePipeline(runtime, point=point, optimizer=opt, codec=codec, staleness=staleness)
    cloud = CloudSession(1, SessionConfig(shared_rng=True))  # one RNG stream: exact comparisons
    hello = hello_frame(spec, point=point, codec=codec, staleness=staleness, optimizer=opt, batch_size=16)
    (ack,) = cloud.handle(wire(hello))
    assert isinstance(ack, fr.HelloAck) and ack.accepted, ack
    return spec, pipe, cloud


def batches(n: int, shape: tuple[int, ...], classes: int, seed: int = 1, bs: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, *shape, generator=g), torch.randint(0, classes, (bs,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_sequential_split_equals_centralized_training(opt_name):
    opt = OptimizerConfig(name=opt_name, lr=0.05 if opt_name == "sgd" else 1e-3, momentum=0.9, schedule="cosine", epochs=3)
    torch.manual_seed(123)
    spec, pipe, cloud = make_split("digits_cnn", point=_interior_point("digits_cnn"), staleness=0, codec="fp32", opt=opt)
    central = zoo.build("digits_cnn", seed=0)
    model = central.model
    from edge_sdk.optim import build_optimizer, set_lr

    c_opt = build_optimizer(model.parameters(), opt)
    data = batches(12, tuple(spec.input_shape), spec.num_classes)

    torch.manual_seed(7)
    for i, (x, y) in enumerate(data):
        epoch = i // 4
        feats = pipe.start_step(x, y, epoch=epoch)
        replies = cloud.handle(wire(feats))
        grads = [r for r in replies if isinstance(r, fr.Gradients)]
        assert len(grads) == 1
        pipe.on_gradients(wire(grads[0]))

    torch.manual_seed(7)
    model.train()
    for i, (x, y) in enumerate(data):
        set_lr(c_opt, opt.lr_at(i // 4))
        c_opt.zero_grad()
        loss, _ = central.loss(model(x), y)
        loss.backward()
        c_opt.step()

    split_state = {**{k: v for k, v in _full_state(spec).items()}}
    cloud_state = {f"blocks.{i + cloud.point}.{k}": v for i, b in enumerate(cloud.blocks) for k, v in b.state_dict().items()}
    head_state = {k: v for k, v in split_state.items() if int(k.split(".")[1]) < cloud.point}
    merged = {**head_state, **cloud_state}
    ref = model.state_dict()
    assert set(merged) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(merged[k].float(), v.float(), rtol=1e-5, atol=1e-5, msg=f"{k} diverged")
    assert pipe.steps_applied == cloud.applied_steps == len(data)


def _interior_point(name: str) -> int:
    model = zoo.build(name).model
    return next(p for p in model.cut_points if 0 < p < model.num_blocks)


def _full_state(spec) -> dict[str, torch.Tensor]:
    return spec.model.state_dict()


class TanhHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def _grad_frame(step: int, g: torch.Tensor) -> fr.Gradients:
    tf, _ = codecs.encode_tensor(g, codecs.Codec.NONE)
    return fr.Gradients(
        step=step, tensor=tf, loss=0.0, correct=0, count=g.shape[0], cloud_ms=0.0, features_recv_ns=0, queue_depth=0
    )


def test_replay_rule_by_hand_with_k2():
    torch.manual_seed(0)
    head = TanhHead()
    w0 = head.lin.weight.detach().clone()
    lr = 0.1
    pipe = EdgePipeline(
        EagerRuntime(head),
        point=1,
        optimizer=OptimizerConfig(name="sgd", lr=lr, momentum=0.0, schedule="constant"),
        codec="fp32",
        staleness=2,
        staleness_guard=False,
    )
    xs = [torch.randn(4, 3) for _ in range(3)]
    gs = [torch.randn(4, 2) for _ in range(3)]
    for x in xs:
        pipe.start_step(x, torch.zeros(4, dtype=torch.long), epoch=0)
    assert not pipe.can_start()  # K+1 = 3 steps in flight

    def head_grad(w, x, g):  # d/dw sum(tanh(x w^T) * g)
        z = x @ w.T
        return ((1 - torch.tanh(z) ** 2) * g).T @ x

    w = w0
    for j in range(3):
        r = pipe.on_gradients(wire(_grad_frame(j, gs[j])))
        w = w - lr * head_grad(w, xs[j], gs[j])  # replayed at the *current* weights
        torch.testing.assert_close(head.lin.weight.detach(), w, rtol=1e-6, atol=1e-6)
        assert r.staleness == j  # step j was computed before j earlier updates landed
    # Not the rule with stale (stashed) weights: that would give a different result.
    w_stash = w0
    for j in range(3):
        w_stash = w_stash - lr * head_grad(w0, xs[j], gs[j])
    assert not torch.allclose(w, w_stash, atol=1e-4)


def test_error_feedback_correction_numerically():
    torch.manual_seed(0)
    head = TanhHead()
    pipe = EdgePipeline(
        EagerRuntime(head),
        point=1,
        optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, schedule="constant"),
        codec="int8",
        staleness=0,
    )
    x = torch.randn(8, 3)
    feats = pipe.start_step(x, torch.zeros(8, dtype=torch.long), epoch=0)
    true_f = torch.tanh(x @ head.lin.weight.detach().T)
    e = codecs.decode_tensor(wire(feats).tensor) - true_f
    assert e.abs().max() > 0  # int8 really is lossy here
    g = torch.randn(8, 2)
    w_before = head.lin.weight.detach().clone()
    pipe.on_gradients(wire(_grad_frame(0, g)))
    g_corr = g - e * g * g
    z = x @ w_before.T
    expected = w_before - 0.1 * (((1 - torch.tanh(z) ** 2) * g_corr).T @ x)
    torch.testing.assert_close(head.lin.weight.detach(), expected, rtol=1e-5, atol=1e-6)

    # switched off: the raw gradient is applied
    head2 = TanhHead()
    head2.load_state_dict({"lin.weight": w_before})
    pipe2 = EdgePipeline(
        EagerRuntime(head2),
        point=1,
        optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, schedule="constant"),
        codec="int8",
        staleness=0,
        error_feedback=False,
    )
    pipe2.start_step(x, torch.zeros(8, dtype=torch.long), epoch=0)
    pipe2.on_gradients(wire(_grad_frame(0, g)))
    expected_raw = w_before - 0.1 * (((1 - torch.tanh(z) ** 2) * g).T @ x)
    torch.testing.assert_close(head2.lin.weight.detach(), expected_raw, rtol=1e-5, atol=1e-6)


def test_each_gradient_applied_exactly_once():
    head = TanhHead()
    pipe = EdgePipeline(
        EagerRuntime(head), point=1, optimizer=OptimizerConfig(name="sgd", lr=0.1, schedule="constant"), codec="fp32", staleness=1
    )
    x = torch.randn(4, 3)
    pipe.start_step(x, torch.zeros(4, dtype=torch.long), epoch=0)
    g = _grad_frame(0, torch.ones(4, 2))
    pipe.on_gradients(g)
    w = head.lin.weight.detach().clone()
    with pytest.raises(StepAccountingError) as dup:
        pipe.on_gradients(g)
    assert dup.value.code == ErrorCode.DUPLICATE_STEP
    with pytest.raises(StepAccountingError) as unknown:
        pipe.on_gradients(_grad_frame(5, torch.ones(4, 2)))
    assert unknown.value.code == ErrorCode.UNKNOWN_STEP
    assert torch.equal(head.lin.weight.detach(), w)
    assert pipe.steps_applied == 1


class DropBNHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.lin(x)))


def test_replay_reuses_dropout_mask_and_counts_batchnorm_once():
    torch.manual_seed(3)
    head = DropBNHead()
    runtime = EagerRuntime(head)
    pipe = EdgePipeline(
        runtime,
        point=1,
        optimizer=OptimizerConfig(name="sgd", lr=1e-9, momentum=0.0, schedule="constant"),
        codec="fp32",
        staleness=0,
    )
    x = torch.randn(16, 5)
    feats = pipe.start_step(x, torch.zeros(16, dtype=torch.long), epoch=0)
    sent = codecs.decode_tensor(feats.tensor)
    stats_after_forward = (head.bn.running_mean.clone(), head.bn.num_batches_tracked.clone())

    seen = {}

    def capture(module, inputs, output):
        seen["replayed"] = output.detach().clone()

    hook = head.register_forward_hook(capture)
    torch.rand(100)  # move the global RNG: replay must not depend on it
    pipe.on_gradients(_grad_frame(0, torch.ones(16, 6)))
    hook.remove()
    torch.testing.assert_close(seen["replayed"], sent)  # same dropout mask, same batch statistics
    assert torch.equal(head.bn.running_mean, stats_after_forward[0])
    assert int(head.bn.num_batches_tracked) == 1 == int(stats_after_forward[1])


def test_cloud_is_idempotent_on_repeated_step():
    opt = OptimizerConfig(name="sgd", lr=0.1, schedule="constant")
    spec, pipe, cloud = make_split("digits_cnn", point=_interior_point("digits_cnn"), staleness=1, codec="int8", opt=opt)
    ((x, y),) = batches(1, tuple(spec.input_shape), spec.num_classes)
    feats = wire(pipe.start_step(x, y, epoch=0))
    first = cloud.handle(feats)
    tail_after = copy.deepcopy([b.state_dict() for b in cloud.blocks])
    again = cloud.handle(feats)
    assert cloud.applied_steps == 1
    assert first[0] is again[0]
    for b, sd in zip(cloud.blocks, tail_after):
        for k, v in b.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_cloud_refuses_features_before_hello_and_bad_points():
    cloud = CloudSession(1, SessionConfig(shared_rng=True))  # one RNG stream: exact comparisons
    tf, _ = codecs.encode_tensor(torch.zeros(2, 3), codecs.Codec.NONE)
    feats = fr.Features(
        step=0,
        epoch=0,
        point=1,
        tensor=tf,
        labels=codecs.tensor_frame_from_array(torch.zeros(2, dtype=torch.long).numpy()),
        train=True,
        grad_codec="fp32",
    )
    (err,) = cloud.handle(feats)
    assert isinstance(err, fr.Error) and err.code == ErrorCode.PROTOCOL

    opt = OptimizerConfig()
    _spec, _pipe, cloud = make_split("digits_cnn", point=_interior_point("digits_cnn"), staleness=0, codec="fp32", opt=opt)
    bad = fr.Features(step=0, epoch=0, point=cloud.point + 1, tensor=tf, labels=feats.labels, train=True, grad_codec="fp32")
    (err,) = cloud.handle(bad)
    assert isinstance(err, fr.Error) and "point" in err.message
    assert cloud.applied_steps == 0


def test_cloud_refuses_wrong_token_and_model_hash():
    from cloud_backend.session import SessionConfig

    spec = zoo.build("digits_cnn")
    base = dict(
        model=spec.name,
        model_hash=spec.config_hash,
        num_blocks=spec.model.num_blocks,
        point=_interior_point("digits_cnn"),
        codec="int8",
        staleness=0,
        optimizer_json=OptimizerConfig().to_json(),
        token="nope",
        batch_size=16,
        seed=0,
        config_json="{}",
        runtime="eager",
        program_hash="",
    )
    (err,) = CloudSession(1, SessionConfig(token="secret")).handle(fr.Hello(**base))
    assert err.code == ErrorCode.UNAUTHORIZED
    (ok,) = CloudSession(1, SessionConfig(token="secret")).handle(fr.Hello(**{**base, "token": "secret"}))
    assert isinstance(ok, fr.HelloAck)
    (err,) = CloudSession(1).handle(fr.Hello(**{**base, "model_hash": "0" * 64}))
    assert err.code == ErrorCode.MODEL_MISMATCH
    (err,) = CloudSession(1).handle(fr.Hello(**{**base, "model": "no_such_model"}))
    assert err.code == ErrorCode.UNKNOWN_MODEL


def test_staleness_guard_caps_outlier_gradients_only_when_stale():
    from edge_sdk.pipeline import StalenessGuard

    guard = StalenessGuard(warmup=3, alpha=0.5)
    p = torch.zeros(4, requires_grad=True)
    norms = []
    for scale in (1.0, 1.0, 1.0, 1.0, 10.0):
        p.grad = torch.full((4,), scale / 2)  # norm = scale
        norms.append(guard.apply([p]))
    assert norms[:4] == pytest.approx([1.0] * 4)
    assert norms[4] == pytest.approx(1.0)  # the 10x outlier is capped at the running norm
    assert torch.linalg.vector_norm(p.grad) == pytest.approx(1.0)
    assert guard.clipped == 1

    # K = 0: exact updates, the guard is not consulted
    head = TanhHead()
    pipe = EdgePipeline(
        EagerRuntime(head),
        point=1,
        optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, schedule="constant"),
        codec="fp32",
        staleness=0,
    )
    for i in range(8):
        pipe.start_step(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), epoch=0)
        pipe.on_gradients(_grad_frame(i, torch.randn(4, 2) * (100 if i == 7 else 1)))
    assert pipe.guard.threshold is None and pipe.guard.clipped == 0
