"""Model builds never run while another session computes (FX tracing patches torch.nn.Module globally)."""

from __future__ import annotations

import threading

import torch

from cloud_backend.model_lock import SharedExclusiveLock
from cloud_backend.session import CloudSession
from edge_sdk import zoo
from schemas import codecs
from schemas import frames as fr


def test_exclusive_waits_for_shared_holders_and_shared_is_concurrent():
    lock = SharedExclusiveLock()
    inside, release, built = threading.Event(), threading.Event(), threading.Event()

    def reader():
        with lock.shared():
            inside.set()
            release.wait(10)

    def builder():
        with lock.exclusive():
            built.set()

    r = threading.Thread(target=reader)
    r.start()
    assert inside.wait(10)
    with lock.shared():  # a second reader gets in beside the first
        pass
    b = threading.Thread(target=builder)
    b.start()
    assert not built.wait(0.2)  # the build waits for the reader
    release.set()
    assert built.wait(10)
    r.join(10)
    b.join(10)


def test_a_resnet_hello_does_not_break_a_session_that_is_training(hello_frame, digits_spec):
    """Found by bench/fuzz_live.py: a ResNet Hello FX-traces while another thread's forward ran."""
    training = CloudSession(1)
    assert isinstance(training.handle(hello_frame(digits_spec))[0], fr.HelloAck)
    with torch.no_grad():
        feats = digits_spec.model.head(2)(torch.randn(8, 1, 8, 8))
    tf, _ = codecs.encode_tensor(feats, codecs.Codec.NONE)
    labels = codecs.tensor_frame_from_tensor(torch.zeros(8, dtype=torch.long))
    resnet = zoo.build("resnet50")  # the test's own build, before anything computes
    stop, errors, steps = threading.Event(), [], [0]

    def train():
        while not stop.is_set() and not errors:
            out = training.handle(fr.Features(step=steps[0], epoch=0, point=2, tensor=tf, labels=labels, grad_codec="fp32"))
            errors.extend(o for o in out if isinstance(o, fr.Error))
            steps[0] += 1

    t = threading.Thread(target=train)
    t.start()
    try:
        for _ in range(2):
            assert isinstance(CloudSession(2).handle(hello_frame(resnet, point=3))[0], fr.HelloAck)
    finally:
        stop.set()
        t.join(30)
    assert errors == [] and steps[0] > 0
