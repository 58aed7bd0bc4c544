"""One example of every frame type, every field set away from its default.

Used by the wire tests (round trip, generated-code cross-check, flatc interop,
fuzz seeds) and handy for other packages' tests.
"""

from __future__ import annotations

import numpy as np
import torch

from .codecs import Codec, encode_tensor, tensor_frame_from_array
from .errors import ErrorCode
from .frames import (
    Bye,
    Checkpoint,
    CheckpointAck,
    Context,
    Envelope,
    EpochEnd,
    Error,
    EvalResult,
    Features,
    Gradients,
    Hello,
    HelloAck,
    Repartition,
    RepartitionAck,
    Weights,
)


def sample_frames(shape=(2, 3, 4, 5), codec: Codec = Codec.INT8_CHANNEL) -> list:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    feats = encode_tensor(x, codec)[0]
    grads = encode_tensor(x * 1e-3, Codec.FP16)[0]
    labels = tensor_frame_from_array(np.arange(shape[0], dtype=np.int64) * 3 + 2**33)
    w = tensor_frame_from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    return [
        Hello(
            model="resnet_cifar",
            model_hash="9f86d081",
            num_blocks=6,
            point=2,
            codec="int8c",
            staleness=3,
            optimizer_json='{"name": "sgd", "lr": 0.05, "momentum": 0.9}',
            token="s3cr\u00e9t",
            batch_size=64,
            seed=-5,
            config_json='{"width": 16}',
            runtime="executorch",
            program_hash="c0ffee",
        ),
        HelloAck(session=2**64 - 2, accepted=True, point=3, codec="int4", staleness=1, message="welcome \u2713"),
        Features(step=2**40 + 7, epoch=3, point=2, tensor=feats, labels=labels, train=False, grad_codec="fp16"),
        Gradients(
            step=12,
            tensor=grads,
            loss=2.302585092994046,
            correct=17,
            count=64,
            cloud_ms=3.25,
            features_recv_ns=1_700_000_000_123_456_789,
            queue_depth=2,
        ),
        Context(
            step=99,
            uplink_bps=12.5e6,
            downlink_bps=80e6,
            rtt_ms=21.5,
            cloud_step_ms=4.5,
            cloud_block_ms=[0.5, 1.25, 2.0],
            queue_depth=1,
            request=True,
            recv_ns=-3,
            padding=1000,
            reply_padding=4096,
        ),
        Repartition(step=100, point=4, codec="fp16", staleness=0, state_hash="ab" * 32),
        RepartitionAck(step=100, point=4, accepted=True, message="moved 2 blocks", state_matched=True),
        Weights(step=100, name="blocks.2.conv.weight/exp_avg", kind="optim", tensor=w, chunk=2, chunks=5, last=True, block=2),
        EpochEnd(epoch=4, step=640, train=False),
        EvalResult(epoch=4, loss=0.125, correct=900, count=1000),
        Error(code=ErrorCode.DUPLICATE_STEP, message="step 5 already seen", step=5),
        Bye(reason="done"),
        Checkpoint(step=640, epoch=4),
        CheckpointAck(step=640, saved=True, message="saved"),
    ]


def sample_envelopes(**kw) -> list[Envelope]:
    return [Envelope(f, session=77 + i, seq=1000 + i, sent_ns=1_000_000_007 * (i + 1)) for i, f in enumerate(sample_frames(**kw))]
