"""Per-block profiles, the profile CLI, device slowdowns, centralized convergence."""

from __future__ import annotations

import json

import pytest
import torch

from edge_sdk import data, devices, zoo
from edge_sdk.cli import main as cli_main
from edge_sdk.decision.cost_model import AUTO_CODECS
from edge_sdk.profile import ModelProfile, profile_model
from edge_sdk.zoo.recipes import RECIPES, train_centralized
from schemas.codecs import encoded_nbytes


@pytest.fixture(scope="module")
def digits_profile() -> ModelProfile:
    return profile_model(zoo.build("digits_cnn"), batch_size=8, repeats=2)


def test_profile_sizes_are_exact(digits_profile):
    prof = digits_profile
    assert [b.name for b in prof.blocks] == ["conv1_bn", "conv2_pool", "conv3_pool", "fc1_dropout", "fc2"]
    assert [b.output_shape for b in prof.blocks] == [[8, 16, 8, 8], [8, 32, 4, 4], [8, 64, 2, 2], [8, 128], [8, 10]]
    b0 = prof.blocks[0]
    assert b0.param_count == 16 * 9 + 32 and b0.param_bytes == 4 * (16 * 9 + 32)
    assert b0.buffer_bytes == 4 * 32 + 8  # running mean/var + num_batches_tracked (int64)
    assert b0.optimizer_state_bytes == b0.param_bytes  # SGD momentum: one buffer per parameter
    assert prof.cut_bytes(1, "fp32") == 8 * 1024 * 4
    assert prof.cut_bytes(0, "fp32") == 8 * 64 * 4
    assert prof.cut_bytes(3, "fp16") == 8 * 256 * 2
    for p in prof.cut_points:
        sizes = [prof.cut_bytes(p, c) for c in ("fp32", "fp16", "int8")]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
        shape = prof.input_shape if p == 0 else prof.blocks[p - 1].output_shape
        for c in AUTO_CODECS:  # the wire codec's own size formula, not a local copy
            assert prof.cut_bytes(p, c) == encoded_nbytes(tuple(shape), c)
    assert all(b.forward_ms > 0 and b.backward_ms > 0 for b in prof.blocks)
    # conv1 saves its input for the weight gradient, BN its input, ReLU its output...
    assert b0.activation_bytes >= 8 * 1024 * 4
    assert b0.peak_activation_bytes == b0.activation_bytes + 8 * 1024 * 4


def test_profile_adam_state_and_json_roundtrip():
    prof = profile_model(zoo.build("mnist1d_cnn"), batch_size=4, optimizer="adam", repeats=1)
    for b in prof.blocks:
        n_tensors = 4 if b.index == 0 else 2  # conv1: conv weight+bias, BN weight+bias
        # exp_avg + exp_avg_sq per parameter, plus one float32 step counter per tensor
        assert b.optimizer_state_bytes == 2 * b.param_bytes + 4 * n_tensors
    doc = json.loads(json.dumps(prof.to_dict()))
    assert doc["cuts"][2]["p"] == 2 and doc["cuts"][2]["cut_bytes"]["fp32"] == 4 * 32 * 20 * 4
    assert ModelProfile.from_dict(doc) == prof


def test_profile_does_not_touch_the_model():
    spec = zoo.build("digits_cnn")
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    profile_model(spec, batch_size=4, repeats=1)
    assert all(torch.equal(before[k], v) for k, v in spec.model.state_dict().items())
    with pytest.raises(ValueError, match="only 'eager'"):
        profile_model(spec, batch_size=4, runtime="executorch")
    with pytest.raises(ValueError, match="unknown optimizer"):
        profile_model(spec, batch_size=4, optimizer="lbfgs")


def test_profile_int_inputs_are_not_quantized():
    prof = profile_model(zoo.build("din", history=4), batch_size=2, repeats=1)
    assert prof.input_dtype == "int64"
    assert set(prof.input_bytes.values()) == {2 * 11 * 8}


def test_profile_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = cli_main(
        [
            "profile",
            "--model",
            "digits_cnn",
            "--batch-size",
            "4",
            "--repeats",
            "1",
            "--optimizer",
            "adam",
            "--device",
            "raspberry-pi-4",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "conv1_bn" in text and "cut int8" in text and "times x8 for raspberry-pi-4" in text
    doc = json.loads(out.read_text())
    assert doc["model"] == "digits_cnn" and doc["optimizer"] == "adam" and doc["device"]["slowdown"] == 8.0
    assert len(doc["blocks"]) == 5 and doc["cut_points"] == [0, 1, 2, 3, 4, 5]


def test_devices():
    assert devices.get_device("Raspberry Pi 4") is devices.get_device("rpi4")
    assert devices.get_device("jetson_tx2").slowdown == 5.0
    assert devices.get_device("mid-range-phone").memory_budget_bytes == 2 << 30
    assert {"raspberry-pi-4", "jetson-tx2", "mid-range-phone"} <= set(devices.names())
    with pytest.raises(ValueError, match="unknown device 'pi5'; known devices: desktop, raspberry-pi-4"):
        devices.get_device("pi5")


def test_digits_centralized_convergence_short():
    """The bench recipe, cut to 4 epochs: already far above chance, loss falling."""
    recipe = RECIPES["digits_cnn"]
    spec = zoo.build("digits_cnn", seed=recipe.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and immune to a busy machine
    try:
        res = train_centralized(spec, data.load("digits", seed=recipe.seed), recipe, epochs=4)
    finally:
        torch.set_num_threads(threads)
    assert res.steps == 4 * 45
    assert res.epoch_train_loss[-1] < 0.5 * res.epoch_train_loss[0]
    assert res.final_test_accuracy >= 0.93
