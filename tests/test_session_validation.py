"""A cloud session refuses every bad frame before it changes any state (sans-I/O).

Each case here is a defect a live hostile-client run found: the frame used to
kill the session's worker, change the weights before being refused, or make the
server allocate far more than the frame's size. A refused step must leave the
tail bit-identical and must not be cached as applied.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cloud_backend import session as session_mod
from cloud_backend.session import CloudSession, Phase, SessionConfig
from cloud_backend.validation import ModelPlan
from edge_sdk import migration, repartition, zoo
from edge_sdk.optim import OptimizerConfig
from edge_sdk.pipeline import EdgePipeline
from edge_sdk.runtime.eager import EagerRuntime
from schemas import codecs
from schemas import frames as fr
from schemas.errors import ErrorCode

POINT = 2
BATCH = 8


def wire(frame):
    return fr.decode(fr.encode(fr.Envelope(frame=frame))).frame


@pytest.fixture
def spec(digits_spec) -> zoo.ModelSpec:
    return digits_spec


@pytest.fixture
def cloud(spec, hello_frame) -> CloudSession:
    s = CloudSession(7)
    (ack,) = s.handle(wire(hello_frame(spec)))
    assert isinstance(ack, fr.HelloAck), ack
    return s


def features(spec, step=0, *, labels=None, x=None, grad_codec="fp32", epoch=0, codec=codecs.Codec.INT8_TENSOR, train=True):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, 1, 8, 8, generator=g) if x is None else x
    with torch.no_grad():
        f = spec.model.head(POINT)(x)
    tf, _ = codecs.encode_tensor(f, codec)
    y = torch.randint(0, 10, (BATCH,), generator=g) if labels is None else labels
    return fr.Features(
        step=step,
        epoch=epoch,
        point=POINT,
        tensor=tf,
        labels=codecs.tensor_frame_from_tensor(y),
        train=train,
        grad_codec=grad_codec,
    )


def tail_state(cloud: CloudSession) -> dict[str, torch.Tensor]:
    out = {f"{i}.{k}": v.clone() for i, b in enumerate(cloud.blocks) for k, v in b.state_dict().items()}
    if cloud.optimizer is not None:
        for j, st in enumerate(cloud.optimizer.state.values()):
            for k, v in st.items():
                out[f"opt{j}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def refused(replies, code: ErrorCode) -> fr.Error:
    (err,) = replies
    assert isinstance(err, fr.Error), err
    assert err.code == code, (err.code, err.message)
    return err


# --------------------------------------------------------------- train steps
@pytest.mark.parametrize(
    "labels, what",
    [
        (torch.full((BATCH,), 10), "class labels must be in [0, 10)"),
        (torch.full((BATCH,), -1), "class labels must be in [0, 10)"),
        (torch.tensor(3), "labels of shape ()"),
        (torch.zeros(BATCH, 2, dtype=torch.long), "one integer per sample"),
        (torch.zeros(BATCH), "one integer per sample"),
        (torch.zeros(BATCH - 1, dtype=torch.long), "for a batch of 8"),
    ],
)
def test_bad_labels_are_refused_and_change_nothing(spec, cloud, labels, what):
    # one good step first, so that optimizer state exists and must stay put too
    assert isinstance(cloud.handle(wire(features(spec, 0)))[-1], fr.Gradients)
    before = tail_state(cloud)
    err = refused(cloud.handle(wire(features(spec, 1, labels=labels))), ErrorCode.BAD_TENSOR)
    assert what in err.message and err.step == 1
    assert_same(before, tail_state(cloud))
    assert cloud.applied_steps == 1 and 1 not in cloud.replies and cloud.phase is Phase.TRAINING
    # the same step id with honest labels is applied: the refusal was not cached
    assert isinstance(cloud.handle(wire(features(spec, 1)))[-1], fr.Gradients)
    assert cloud.applied_steps == 2


def test_non_finite_features_are_refused_and_the_session_stays_healthy(spec, cloud):
    before = tail_state(cloud)
    x = features(spec, 0, codec=codecs.Codec.NONE)
    payload = x.tensor.payload.copy()
    payload[3] = np.nan
    x.tensor.payload = payload
    err = refused(cloud.handle(wire(x)), ErrorCode.BAD_TENSOR)
    assert "NaN" in err.message
    assert_same(before, tail_state(cloud))
    for step in range(3):
        assert isinstance(cloud.handle(wire(features(spec, step)))[-1], fr.Gradients)
    assert all(bool(torch.isfinite(v).all()) for v in tail_state(cloud).values())


def test_huge_finite_features_that_overflow_the_loss_leave_weights_and_statistics_alone(spec, cloud):
    before = tail_state(cloud)
    x = features(spec, 0, codec=codecs.Codec.NONE)
    x.tensor.payload = np.full_like(x.tensor.payload, 3e38)
    err = refused(cloud.handle(wire(x)), ErrorCode.BAD_TENSOR)
    assert "not finite" in err.message
    assert_same(before, tail_state(cloud))  # batch-norm running statistics restored too
    assert cloud.applied_steps == 0 and not cloud.replies


def test_unknown_gradient_codec_is_refused_before_the_optimizer_steps(spec, cloud):
    before = tail_state(cloud)
    for _ in range(2):  # re-sending the same bad step changes nothing either
        refused(cloud.handle(wire(features(spec, 0, grad_codec="bogus"))), ErrorCode.MALFORMED)
        assert_same(before, tail_state(cloud))
    assert cloud.applied_steps == 0 and not cloud.replies


def test_an_absurd_epoch_is_refused(spec, cloud):
    before = tail_state(cloud)
    err = refused(cloud.handle(wire(features(spec, 0, epoch=2**31 - 1))), ErrorCode.MALFORMED)
    assert "epoch" in err.message
    assert_same(before, tail_state(cloud))


def test_feature_claims_are_checked_before_anything_is_decoded(spec, cloud, monkeypatch):
    calls = []
    monkeypatch.setattr(session_mod.codecs, "decode_tensor", lambda tf: calls.append(tf))
    wrong_shape = features(spec)
    wrong_shape.tensor = codecs.TensorFrame(
        dtype=codecs.DType.F32,
        shape=(BATCH, 64, 64, 64),
        codec=codecs.Codec.TOPK,
        payload=np.zeros(1, np.float32),
        k=1,
        indices=np.zeros(1, np.uint32),
    )
    err = refused(cloud.handle(wire(wrong_shape)), ErrorCode.BAD_TENSOR)
    assert "carries (B, 32, 4, 4)" in err.message
    big_batch = features(spec, x=torch.randn(BATCH + 1, 1, 8, 8), labels=torch.zeros(BATCH + 1, dtype=torch.long))
    refused(cloud.handle(wire(big_batch)), ErrorCode.LIMIT_EXCEEDED)
    coded_labels = features(spec)
    coded_labels.labels, _ = codecs.encode_tensor(torch.zeros(BATCH), codecs.Codec.INT8_TENSOR)
    refused(cloud.handle(wire(coded_labels)), ErrorCode.BAD_TENSOR)
    assert calls == []


def test_eval_frames_are_validated_too(spec, cloud):
    refused(cloud.handle(wire(features(spec, labels=torch.full((BATCH,), 99), train=False))), ErrorCode.BAD_TENSOR)
    assert cloud.handle(wire(features(spec, train=False))) == []
    (res,) = cloud.handle(fr.EpochEnd(epoch=0, step=0, train=False))
    assert isinstance(res, fr.EvalResult) and res.count == BATCH  # the refused batch was not counted


def test_an_unexpected_exception_becomes_internal_and_closes_the_session(spec, cloud, monkeypatch, caplog):
    def broken_loss(out, target):
        raise KeyError("a bug")

    monkeypatch.setattr(cloud.spec, "loss", broken_loss)
    with caplog.at_level("ERROR", logger="cloud_backend"):
        err = refused(cloud.handle(wire(features(spec))), ErrorCode.INTERNAL)
    assert "a bug" not in err.message and "Traceback" not in err.message  # no internals to the peer
    assert cloud.phase is Phase.CLOSED
    (line,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "session 7" in line.getMessage() and "KeyError" in line.getMessage()
    refused(cloud.handle(wire(features(spec, 1))), ErrorCode.PROTOCOL)


# --------------------------------------------------------------------- hello
@pytest.mark.parametrize(
    "opt_json",
    [
        {"momentum": "x"},
        {"weight_decay": None},
        {"schedule": "step", "step_every": 0},
        {"lr": -1},
        {"lr": float("inf")},
        {"epochs": True},
        {"step_gamma": 10.0, "schedule": "step"},
        {"name": "lbfgs"},
        {"nope": 1},
        [1, 2],
    ],
)
def test_bad_optimizer_configs_are_refused_at_hello(spec, hello_frame, opt_json):
    text = json.dumps(opt_json)
    err = refused(CloudSession(1).handle(wire(hello_frame(spec, optimizer_json=text))), ErrorCode.MALFORMED)
    assert "optimizer" in err.message


@pytest.mark.parametrize(
    "field, value",
    [
        ("codec", "bogus"),
        ("staleness", -1),
        ("staleness", 10_000),
        ("batch_size", 0),
        ("batch_size", 10**6),
        ("runtime", "wasm"),
    ],
)
def test_bad_hello_fields_are_refused(spec, hello_frame, field, value):
    s = CloudSession(1)
    refused(s.handle(wire(hello_frame(spec, **{field: value}))), ErrorCode.MALFORMED)
    assert s.phase is Phase.AWAIT_HELLO and s.spec is None


def _record_real_builds(monkeypatch) -> list[str]:
    real = []
    original = zoo.build

    def recording(name, seed=0, **kw):
        if torch.get_default_device().type != "meta":
            real.append(name)
        return original(name, seed=seed, **kw)

    monkeypatch.setattr(session_mod.zoo, "build", recording)
    return real


def test_a_wrong_hash_is_refused_before_the_model_is_built(spec, hello_frame, monkeypatch):
    real = _record_real_builds(monkeypatch)
    wide = hello_frame(spec, config_json=json.dumps({"width": 2048}), model_hash="0" * 64)
    refused(CloudSession(1).handle(wire(wide)), ErrorCode.MODEL_MISMATCH)
    assert real == []


def test_a_model_over_the_memory_budget_is_refused_before_it_is_built(spec, hello_frame, monkeypatch):
    real = _record_real_builds(monkeypatch)
    kwargs = {"width": 2048}
    plan = ModelPlan.build("digits_cnn", 0, kwargs)
    wide = hello_frame(spec, config_json=json.dumps(kwargs), model_hash=plan.spec.config_hash)
    err = refused(CloudSession(1, SessionConfig(max_session_bytes=256 << 20)).handle(wire(wide)), ErrorCode.LIMIT_EXCEEDED)
    assert "MiB" in err.message and real == []
    # the same session shape fits a bigger budget, and then the model is built once
    (ack,) = CloudSession(1, SessionConfig(max_session_bytes=64 << 30)).handle(wire(wide))
    assert isinstance(ack, fr.HelloAck) and real == ["digits_cnn"]


def test_memory_estimate_matches_the_real_model(spec):
    plan = ModelPlan.build("digits_cnn", 0, {})
    params = sum(p.numel() * 4 for p in spec.model.parameters())
    assert sum(t.nbytes for t in plan.params.values()) == params
    for p, f in enumerate(plan.features[1:], start=1):
        with torch.no_grad():
            assert tuple(spec.model.head(p)(spec.example_input(1)).shape[1:]) == f.shape


# ------------------------------------------------------------------- weights
def _move_up_frames(spec, cloud, new_point: int) -> list[object]:
    """The frames a device sends to move the cut from POINT down to ``new_point``."""
    opt = OptimizerConfig()
    device = zoo.build("digits_cnn", seed=0)
    pipe = EdgePipeline(EagerRuntime(device.model.head(POINT)), point=POINT, optimizer=opt, codec="int8", staleness=0)
    x, y = torch.randn(BATCH, 1, 8, 8), torch.randint(0, 10, (BATCH,))
    (g,) = [r for r in cloud.handle(wire(pipe.start_step(x, y, epoch=0))) if isinstance(r, fr.Gradients)]
    pipe.on_gradients(wire(g))
    return repartition.request_frames(pipe, device.model, new_point, codec="int8", staleness=0)


def test_a_top_k_weights_bomb_is_refused_before_allocation(spec, cloud, monkeypatch, topk_bomb):
    calls = []
    monkeypatch.setattr(session_mod.codecs, "decode_tensor", lambda tf: calls.append(tf))
    name = next(n for n, _ in spec.model.named_parameters() if n.startswith("blocks.0."))
    bomb = topk_bomb(1 << 26)
    refused(cloud.handle(wire(fr.Weights(step=0, name=name, kind="param", tensor=bomb))), ErrorCode.BAD_TENSOR)
    refused(cloud.handle(wire(fr.Weights(step=0, name="blocks.9.x", kind="param", tensor=bomb))), ErrorCode.MODEL_MISMATCH)
    tail = next(n for n, _ in spec.model.named_parameters() if n.startswith(f"blocks.{POINT}."))
    refused(cloud.handle(wire(fr.Weights(step=0, name=tail, kind="param", tensor=bomb))), ErrorCode.MODEL_MISMATCH)
    assert calls == [] and cloud._incoming is None


def test_wrong_shaped_optimizer_state_is_refused_and_the_cut_stays(spec, cloud):
    frames = _move_up_frames(spec, cloud, 1)
    before = tail_state(cloud)
    errors = []
    for f in frames:
        if isinstance(f, fr.Weights) and f.kind == "optim":
            f.tensor = codecs.tensor_frame_from_tensor(torch.zeros(3, 3))
        errors += [r for r in cloud.handle(wire(f)) if isinstance(r, fr.Error)]
    assert errors and all(e.code == ErrorCode.MODEL_MISMATCH for e in errors[:-1])
    assert cloud.point == POINT  # the repartition was refused: weights missing / state refused
    assert_same(before, tail_state(cloud))
    assert isinstance(cloud.handle(wire(features(spec, 1)))[-1], fr.Gradients)  # still trains at the old cut


def test_partial_optimizer_state_per_parameter_is_refused(spec, hello_frame, monkeypatch):
    # Adam keeps step, exp_avg and exp_avg_sq: dropping one would break the next step
    adam = OptimizerConfig(name="adam", lr=1e-3)
    s = CloudSession(1)
    assert isinstance(s.handle(wire(hello_frame(spec, optimizer_json=adam.to_json())))[0], fr.HelloAck)
    device = zoo.build("digits_cnn", seed=0)
    pipe = EdgePipeline(EagerRuntime(device.model.head(POINT)), point=POINT, optimizer=adam, codec="int8", staleness=0)
    (g,) = [
        r
        for r in s.handle(wire(pipe.start_step(torch.randn(BATCH, 1, 8, 8), torch.zeros(BATCH, dtype=torch.long), epoch=0)))
        if isinstance(r, fr.Gradients)
    ]
    pipe.on_gradients(wire(g))
    frames = [
        f
        for f in repartition.request_frames(pipe, device.model, 1, codec="int8", staleness=0)
        if not (isinstance(f, fr.Weights) and f.name.endswith("/exp_avg_sq") and f.name.startswith("blocks.1."))
    ]
    replies = [r for f in frames for r in s.handle(wire(f))]
    err = refused(replies, ErrorCode.MALFORMED)
    assert "exp_avg_sq" in err.message and s.point == POINT


def test_eval_batches_are_bounded_by_the_protocol_limit(spec, hello_frame):
    s = CloudSession(1)
    assert isinstance(s.handle(wire(hello_frame(spec)))[0], fr.HelloAck)
    n = fr.MAX_EVAL_BATCH
    with torch.no_grad():
        f = spec.model.head(POINT)(torch.zeros(n + 1, 1, 8, 8))
    tf, _ = codecs.encode_tensor(f, codecs.Codec.INT8_TENSOR)
    too_big = fr.Features(
        step=0,
        epoch=0,
        point=POINT,
        tensor=tf,
        train=False,
        labels=codecs.tensor_frame_from_tensor(torch.zeros(n + 1, dtype=torch.long)),
    )
    refused(s.handle(wire(too_big)), ErrorCode.LIMIT_EXCEEDED)
    tf, _ = codecs.encode_tensor(f[:n], codecs.Codec.INT8_TENSOR)
    ok = fr.Features(
        step=0,
        epoch=0,
        point=POINT,
        tensor=tf,
        train=False,
        labels=codecs.tensor_frame_from_tensor(torch.zeros(n, dtype=torch.long)),
    )
    assert s.handle(wire(ok)) == []


def test_the_reply_cache_is_bounded_in_bytes_and_old_steps_are_refused_not_reapplied(spec, hello_frame):
    reply_bytes = BATCH * 32 * 4 * 4 * 4  # fp32 gradient of the (8, 32, 4, 4) cut
    cap = 5 * reply_bytes
    s = CloudSession(1, SessionConfig(reply_cache_bytes=cap))
    assert isinstance(s.handle(wire(hello_frame(spec)))[0], fr.HelloAck)
    for step in range(40):
        assert isinstance(s.handle(wire(features(spec, step)))[-1], fr.Gradients)
    kept = sum(r.tensor.nbytes for r in s.replies.values())
    assert kept <= cap and len(s.replies) == cap // reply_bytes
    assert isinstance(s.handle(wire(features(spec, 39)))[-1], fr.Gradients)  # recent: re-delivered
    refused(s.handle(wire(features(spec, 0))), ErrorCode.DUPLICATE_STEP)  # evicted: refused
    assert s.applied_steps == 40


def test_class_labels_of_any_integer_dtype_train(spec, cloud):
    x = features(spec, 0, labels=torch.zeros(BATCH, dtype=torch.int32))
    assert isinstance(cloud.handle(wire(x))[-1], fr.Gradients)


def test_a_config_that_breaks_the_builder_is_refused_as_unknown_model(spec, hello_frame):
    for config in ({"width": 0}, {"num_classes": -1}, {"dropout": "x"}):
        err = refused(CloudSession(1).handle(wire(hello_frame(spec, config_json=json.dumps(config)))), ErrorCode.UNKNOWN_MODEL)
        assert "cannot build" in err.message


def test_cut_zero_is_refused_for_token_inputs_and_taken_for_float_inputs(spec, hello_frame):
    bilstm = ModelPlan.build("bilstm", 0, {}).spec
    err = refused(CloudSession(1).handle(wire(hello_frame(bilstm, point=0))), ErrorCode.PROTOCOL)
    assert "not a valid cut" in err.message
    assert isinstance(CloudSession(1).handle(wire(hello_frame(spec, point=0)))[0], fr.HelloAck)


def test_repeated_hellos_plan_the_model_once(spec, hello_frame, monkeypatch):
    calls = []
    original = ModelPlan._build.__func__

    def counting(cls, name, seed, kwargs):
        calls.append(name)
        return original(cls, name, seed, kwargs)

    monkeypatch.setattr(ModelPlan, "_build", classmethod(counting))
    config = json.dumps({"width": 24})
    for _ in range(3):
        refused(
            CloudSession(1).handle(wire(hello_frame(spec, config_json=config, model_hash="0" * 64))), ErrorCode.MODEL_MISMATCH
        )
    assert calls == ["digits_cnn"]


@pytest.mark.parametrize(
    "entry, value, what",
    [
        ("param", float("nan"), "NaN or Inf"),
        ("exp_avg_sq", -1.0, "second moments"),
        ("step", -2.0, "step count"),
        ("step", 1.5, "step count"),
    ],
)
def test_migrated_state_must_be_usable(spec, hello_frame, entry, value, what):
    adam = OptimizerConfig(name="adam", lr=1e-3)
    s = CloudSession(1)
    assert isinstance(s.handle(wire(hello_frame(spec, optimizer_json=adam.to_json())))[0], fr.HelloAck)
    device = zoo.build("digits_cnn", seed=0)
    pipe = EdgePipeline(EagerRuntime(device.model.head(POINT)), point=POINT, optimizer=adam, codec="int8", staleness=0)
    step = pipe.start_step(torch.randn(BATCH, 1, 8, 8), torch.zeros(BATCH, dtype=torch.long), epoch=0)
    (g,) = [r for r in s.handle(wire(step)) if isinstance(r, fr.Gradients)]
    pipe.on_gradients(wire(g))
    before = tail_state(s)
    errors = []
    for f in repartition.request_frames(pipe, device.model, 1, codec="int8", staleness=0):
        if isinstance(f, fr.Weights) and f.name.startswith("blocks.1.") and (f.kind == entry or f.name.endswith("/" + entry)):
            t = codecs.decode_tensor(f.tensor).clone()
            t.view(-1)[0] = value
            f.tensor = codecs.tensor_frame_from_tensor(t)
        errors += [r for r in s.handle(wire(f)) if isinstance(r, fr.Error)]
    assert any(what in e.message for e in errors), errors
    assert s.point == POINT
    assert_same(before, tail_state(s))


def test_a_bandwidth_probe_is_answered_with_the_filler_it_asks_for_and_no_more_than_the_cap(cloud):
    (reply,) = cloud.handle(wire(fr.Context(step=0, request=True, padding=5000, reply_padding=5000)), recv_ns=7)
    reply = wire(reply)
    assert isinstance(reply, fr.Context) and reply.padding == 5000 and reply.recv_ns == 7
    # no amplification: a small request cannot ask for a big answer
    for asked in (100_000, 5001):
        (err,) = cloud.handle(fr.Context(step=0, request=True, padding=5000, reply_padding=asked))
        assert isinstance(err, fr.Error) and err.code == ErrorCode.LIMIT_EXCEEDED
    assert cloud.phase is Phase.TRAINING  # refused, the session goes on
    with pytest.raises(ValueError, match="padding"):  # our encoder will not write more filler than the cap
        fr.encode(fr.Envelope(frame=fr.Context(padding=fr.MAX_PADDING + 1)))


def test_a_malformed_state_hash_is_refused_and_a_trained_block_never_matches(cloud, spec):
    (err,) = cloud.handle(wire(fr.Repartition(step=0, point=4, codec="int8", staleness=0, state_hash="é" * 64)))
    assert isinstance(err, fr.Error) and err.code == ErrorCode.MALFORMED and cloud.point == POINT
    # the cloud trains its tail one step: its blocks now carry optimizer state, so
    # even the right hash of the values is no reason to skip sending them
    (_trained,) = [r for r in cloud.handle(wire(features(spec))) if isinstance(r, fr.Gradients)]
    digest = migration.state_hash(cloud.spec.model, range(POINT, 4), {})
    replies = cloud.handle(wire(fr.Repartition(step=1, point=4, codec="int8", staleness=0, state_hash=digest)))
    ack = replies[-1]
    assert isinstance(ack, fr.RepartitionAck) and ack.accepted and not ack.state_matched
    assert any(isinstance(r, fr.Weights) for r in replies)
