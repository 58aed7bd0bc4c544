"""Moving the cut mid-training gives the same model as never moving it (K=0, fp32).

Runs the device session and the cloud session in-process (`tests.inprocess`),
every frame through the real encoder/decoder.
"""

from __future__ import annotations

import pytest
import torch

from edge_sdk import repartition, zoo
from edge_sdk.optim import OptimizerConfig
from schemas import codecs
from schemas import frames as fr
from tests.inprocess import InProcessRun, wire


def _fixed_and_data(opt: OptimizerConfig) -> tuple[InProcessRun, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(12)]
    torch.manual_seed(11)
    fixed = InProcessRun("digits_cnn", 2, opt)
    for x, y in data:
        fixed.step(x, y, 0)
    return fixed, data


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_moving_the_cut_both_ways_matches_a_fixed_cut(opt_name):
    opt = OptimizerConfig(name=opt_name, lr=0.05 if opt_name == "sgd" else 2e-3, momentum=0.9, schedule="constant")
    fixed, data = _fixed_and_data(opt)

    torch.manual_seed(11)
    moving = InProcessRun("digits_cnn", 2, opt)
    for i, (x, y) in enumerate(data):
        if i == 4:
            moving.move_to(4)  # deeper: blocks 2, 3 come to the device
        if i == 8:
            moving.move_to(1)  # shallower: blocks 1..3 go to the cloud
        moving.step(x, y, 0)
    assert list(moving.cloud.partition_history) == [(4, 4), (8, 1)]

    a, b = fixed.merged_state(), moving.merged_state()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-5, atol=1e-5, msg=f"{k} differs after moving the cut")
    # and the moving run really trained (the state differs from the initial one)
    init = zoo.build("digits_cnn", seed=0).model.state_dict()
    assert not torch.allclose(b["blocks.4.weight"], init["blocks.4.weight"])
    assert moving.pipe.steps_applied == moving.cloud.applied_steps == len(data)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_alone_and_back_matches_a_fixed_cut(opt_name):
    """Device-only (p = L) is a cut like the others: every block and its optimizer
    state come down, the device trains alone with the loss taken locally, then the
    tail goes back up; at K=0 fp32 the model is the one a fixed split trains."""
    opt = OptimizerConfig(name=opt_name, lr=0.05 if opt_name == "sgd" else 2e-3, momentum=0.9, schedule="constant")
    fixed, data = _fixed_and_data(opt)
    L = fixed.model.num_blocks

    torch.manual_seed(11)
    moving = InProcessRun("digits_cnn", 2, opt)
    for i, (x, y) in enumerate(data):
        if i == 4:
            moving.move_to(L)  # the whole model comes to the device
            assert moving.cloud.blocks == [] and moving.cloud.optimizer is None
        if i == 8:
            moving.move_to(1)  # blocks 1..L go back to the cloud
        moving.step(x, y, 0)
    assert list(moving.cloud.partition_history) == [(4, L), (8, 1)]

    a, b = fixed.merged_state(), moving.merged_state()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-5, atol=1e-5, msg=f"{k} differs after training alone")
    # exact step accounting: 12 steps, of which the cloud applied the 8 split ones,
    # and the step ids went on counting through the device-only stretch
    assert moving.pipe.steps_applied == 12 and moving.cloud.applied_steps == 8
    assert moving.pipe.next_step == 12 and moving.cloud.last_step == 11


def test_blocks_the_device_already_holds_do_not_travel():
    """Both ends build the model from the seed: before those blocks trained, the
    device's copy has the cloud's hash, and moving the cut sends no weights."""
    opt = OptimizerConfig(lr=0.05, momentum=0.9, schedule="constant")
    fixed, data = _fixed_and_data(opt)
    torch.manual_seed(11)
    moving = InProcessRun("digits_cnn", 2, opt)
    L = moving.model.num_blocks
    assert moving.move_to(L) == []  # step 0: nothing trained yet, nothing sent
    for x, y in data[:4]:
        moving.step(x, y, 0)
    moving.move_to(2)  # blocks 2.. trained on the device: they go up (checked by the state below)
    for x, y in data[4:]:
        moving.step(x, y, 0)
    a, b = fixed.merged_state(), moving.merged_state()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-5, atol=1e-5, msg=k)
    # blocks 2.. trained on the cloud since: the device's copy is stale, the weights travel
    assert len(moving.move_to(L)) > 0


def test_cloud_refuses_features_while_the_device_trains_alone():
    run = InProcessRun("digits_cnn", 2, OptimizerConfig())
    run.move_to(run.model.num_blocks)
    feats, _ = codecs.encode_tensor(torch.zeros(4, 8, 4, 4), codecs.Codec.NONE)
    frame = fr.Features(
        step=0, epoch=0, point=2, tensor=feats, labels=codecs.tensor_frame_from_tensor(torch.zeros(4, dtype=torch.long))
    )
    (err,) = run.cloud.handle(wire(frame))
    assert isinstance(err, fr.Error) and "trains alone" in err.message
    with pytest.raises(RuntimeError, match="local_step"):
        run.pipe.start_step(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), epoch=0)


def test_repartition_requires_a_drained_pipeline():
    run = InProcessRun("digits_cnn", 2, OptimizerConfig(), staleness=2)
    run.pipe.start_step(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), epoch=0)
    with pytest.raises(RuntimeError, match="drain"):
        repartition.request_frames(run.pipe, run.model, 3, codec="fp32", staleness=2)


def test_cloud_refuses_a_shallower_cut_without_the_weights():
    run = InProcessRun("digits_cnn", 3, OptimizerConfig())
    (err,) = run.cloud.handle(wire(fr.Repartition(step=0, point=1, codec="fp32", staleness=0)))
    assert isinstance(err, fr.Error) and "missing" in err.message
    assert run.cloud.point == 3
