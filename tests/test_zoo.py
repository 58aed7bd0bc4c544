"""Model zoo: parameter counts, output shapes, seeded determinism, losses, weights."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from edge_sdk import zoo
from edge_sdk.zoo import WeightsError, load_weights, save_weights
from edge_sdk.zoo.resnet import resnet50
from edge_sdk.zoo.vision import mobilenetv3_large


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# exact counts; the big ones match the published reference implementations
# (torchvision resnet50 at 1000 classes = 25,557,032; torchvision
# mobilenet_v3_large = 5,483,032; the common CIFAR VGG-19-BN = 20,040,522;
# CIFAR ResNet-50 = 23,520,842)
PARAMS = {
    "resnet50": 23_520_842,
    "resnet50_imagenet": 23_917_832,  # 200 Tiny ImageNet classes
    "vgg19": 20_040_522,
    "mobilenetv3_large": 4_214_842,
    "bilstm": 3_236_034,
    "chair_generator": 21_266_020,
    "din": 312_708,
    "digits_cnn": 57_498,
    "mnist1d_cnn": 106_666,
}
OUT = {
    "resnet50": (10,),
    "resnet50_imagenet": (200,),
    "vgg19": (10,),
    "mobilenetv3_large": (10,),
    "bilstm": (2,),
    "chair_generator": (4, 128, 128),
    "din": (1,),
    "digits_cnn": (10,),
    "mnist1d_cnn": (10,),
}


def test_names_and_unknown_name():
    assert zoo.names() == sorted(PARAMS)
    with pytest.raises(ValueError, match="unknown model 'alexnet'; known models: bilstm, chair_generator"):
        zoo.build("alexnet")
    with pytest.raises(ValueError, match="bad arguments for model 'digits_cnn'"):
        zoo.build("digits_cnn", nonsense=1)


# smaller inputs where that does not change the parameter count (keeps CPU tests fast)
SMALL_INPUT = {"bilstm": {"seq_len": 16}, "resnet50_imagenet": {"image_size": 32}}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count_and_output_shape(name):
    spec = zoo.build(name, **SMALL_INPUT.get(name, {}))
    assert n_params(spec.model) == PARAMS[name]
    assert spec.output_shape == OUT[name]
    spec.model.eval()
    with torch.no_grad():
        x = spec.example_input(1)
        assert x.dtype == spec.input_dtype and x.shape[1:] == spec.input_shape
        mid = spec.model.cut_points[len(spec.model.cut_points) // 2]
        y = spec.model.tail(mid)(spec.model.head(mid)(x))  # a real single-tensor cut
        assert y.shape == (1, *OUT[name])
    assert len(spec.model.cut_points) >= 5
    if name == "resnet50":  # traced automatically: cuts between bottlenecks only
        m = spec.model
        assert m.num_blocks == 19  # conv1 | bn1+relu | 16 bottlenecks (last + avgpool) | fc
        assert m.block_names[:4] == ["conv1", "bn1..maxpool", "layer1.0", "layer1.1"]
        assert m.block_names[-2:] == ["layer4.2.conv1..avgpool", "fc"]
        assert m.blocks[-1].fc.weight.shape == (10, 2048)


def test_reference_param_counts_at_1000_classes():
    assert n_params(mobilenetv3_large(1000, stem_stride=2)) == 5_483_032
    assert n_params(resnet50(1000, stem="imagenet")) == 25_557_032


@pytest.mark.parametrize("name", ["digits_cnn", "din", "mobilenetv3_large"])
def test_same_seed_bit_identical_other_seed_differs(name):
    a, b, c = zoo.build(name, seed=3), zoo.build(name, seed=3), zoo.build(name, seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert a.config_hash == b.config_hash == c.config_hash  # hash = architecture, not weights


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("digits_cnn", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_config_hash_is_pinned_and_tracks_kwargs():
    # pinned: the same on any machine; a change here means the architecture changed
    h = zoo.build("digits_cnn").config_hash
    assert h == "3bcfaa485299b3caf5132cbae93fcacff96ccc8ccff725525b7a7f7d827f152e"
    assert zoo.build("mnist1d_cnn").config_hash == "43057fa2a701426eedc2c5a3a7746cc1e65d3fb70fa248ad6f08638572c28d64"
    assert zoo.build("digits_cnn", width=8).config_hash != h
    assert zoo.build("mnist1d_cnn").config_hash != h


def test_small_models_shrink_the_cut_and_have_bn_and_dropout():
    spec = zoo.build("digits_cnn")
    mods = [type(m) for m in spec.model.modules()]
    assert nn.BatchNorm2d in mods and nn.Dropout in mods
    x = spec.example_input(1)
    sizes = [x.numel()]
    for b in spec.model.blocks:
        x = b(x)
        sizes.append(x.numel())
    assert sizes == [64, 1024, 512, 256, 128, 10]
    spec = zoo.build("mnist1d_cnn")
    x, sizes = spec.example_input(1), []
    for b in spec.model.blocks:
        x = b(x)
        sizes.append(x.numel())
    assert sizes == [1280, 640, 640, 320, 256, 10]


def test_losses():
    spec = zoo.build("digits_cnn")
    out = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    loss, correct = spec.loss(out, torch.tensor([0, 1, 1]))
    assert correct == 2
    torch.testing.assert_close(loss, nn.functional.cross_entropy(out, torch.tensor([0, 1, 1])))
    din = zoo.build("din")
    loss, correct = din.loss(torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1.0, 1.0, 0.0]))
    assert correct == 1 and loss.item() > 0
    gen = zoo.build("chair_generator", width=32)
    target = torch.zeros(2, 4, 128, 128)
    loss, correct = gen.loss(torch.full((2, 4, 128, 128), -20.0), target)
    assert correct == 0 and loss.item() < 1e-6  # sigmoid(-20) ~ 0 and mask logit -20 ~ 0


def test_din_mask_survives_the_cut():
    spec = zoo.build("din", history=4)
    ids = torch.tensor([[5, 7, 3, 0, 0, 2, 9, 0, 0, 1, 4]])
    packed = spec.model.head(1)(ids)
    assert packed.shape == (1, 6, 33)
    assert packed[0, :, -1].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_weights_roundtrip_safetensors_and_torch(tmp_path):
    src, dst = zoo.build("digits_cnn", seed=1), zoo.build("digits_cnn", seed=2)
    save_weights(src, tmp_path / "w.safetensors")
    head_w = dst.model.head(1).blocks["0"][0].weight  # handed out before loading
    load_weights(dst, tmp_path / "w.safetensors")
    assert torch.equal(head_w, src.model.blocks[0][0].weight)
    torch.save({"state_dict": zoo.build("digits_cnn", seed=5).model.state_dict()}, tmp_path / "w.pt")
    load_weights(dst, tmp_path / "w.pt")
    assert torch.equal(dst.model.blocks[4].weight, zoo.build("digits_cnn", seed=5).model.blocks[4].weight)


def test_weights_mismatch_errors(tmp_path):
    spec = zoo.build("digits_cnn")
    state = dict(spec.model.state_dict())
    del state["blocks.4.bias"]
    state["blocks.9.weight"] = torch.zeros(1)
    state["blocks.4.weight"] = torch.zeros(3, 128)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError) as err:
        load_weights(spec, tmp_path / "bad.pt")
    msg = str(err.value)
    assert "missing keys: blocks.4.bias" in msg
    assert "unexpected keys: blocks.9.weight" in msg
    assert "blocks.4.weight: file (3, 128) vs model (10, 128)" in msg
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(spec, tmp_path / "nope.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_weights_refuse_pickled_code(tmp_path):
    spec = zoo.build("digits_cnn")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_weights(spec, tmp_path / "evil.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_weights(spec, tmp_path / "junk.safetensors")
