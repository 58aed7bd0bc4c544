"""BlockModel: partition points, head/tail parameter sharing, FX cut discovery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_sdk.blocks import BlockModel


def _seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3))


class PlainResidualCNN(nn.Module):
    """Written with no thought of blocks: a residual CNN with a plain forward()."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.conv_a(x))
        y = self.conv_b(y)
        x = torch.relu(x + y)  # residual: no cut between stem and here
        x = torch.relu(self.down(x))
        x = x.mean(dim=(2, 3))
        return self.head(x)


def test_sequential_blocks_and_cut_points():
    bm = BlockModel.from_sequential(_seq())
    assert bm.num_blocks == 4
    assert bm.cut_points == [0, 1, 2, 3, 4]
    assert bm.block_names == ["0", "1", "2", "3"]
    assert list(bm.state_dict())[:2] == ["blocks.0.weight", "blocks.0.bias"]


def test_head_tail_compose_to_full_model_at_every_point():
    bm = BlockModel.from_sequential(_seq()).eval()
    x = torch.randn(5, 6)
    full = bm(x)
    for p in bm.cut_points:
        torch.testing.assert_close(bm.tail(p)(bm.head(p)(x)), full, rtol=0, atol=0)


def test_head_tail_share_parameters_and_partition_state_dict():
    bm = BlockModel.from_sequential(_seq())
    full = bm.state_dict()
    for p in bm.cut_points:
        h, t = bm.head(p).state_dict(), bm.tail(p).state_dict()
        assert set(h).isdisjoint(t)
        assert set(h) | set(t) == set(full)
        for k, v in {**h, **t}.items():
            assert v.data_ptr() == full[k].data_ptr(), k  # same storage: no copies
    # an in-place update through the head is seen by the full model
    with torch.no_grad():
        bm.head(1).blocks["0"].weight.add_(1.0)
    assert torch.equal(bm.blocks[0].weight, bm.head(2).state_dict()["blocks.0.weight"])


def test_name_maps_are_full_model_names():
    bm = BlockModel.from_sequential(_seq())
    hm, tm = bm.head_name_map(2), bm.tail_name_map(2)
    assert hm == {"blocks.0.weight": "blocks.0.weight", "blocks.0.bias": "blocks.0.bias"}
    assert set(tm.values()) == {
        "blocks.2.weight",
        "blocks.2.bias",
        "blocks.2.running_mean",
        "blocks.2.running_var",
        "blocks.2.num_batches_tracked",
        "blocks.3.weight",
        "blocks.3.bias",
    }
    assert bm.head_param_names(2) == ["blocks.0.weight", "blocks.0.bias"]
    assert bm.tail_param_names(3) == ["blocks.3.weight", "blocks.3.bias"]
    assert bm.block_state_names(3, 2) == list(bm.head(3).state_dict())[2:]


def test_split_gradients_equal_full_gradients():
    bm = BlockModel.from_sequential(_seq()).train()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    nn.functional.cross_entropy(bm(x), y).backward()
    full_grads = {k: p.grad.clone() for k, p in bm.named_parameters()}
    bm.zero_grad(set_to_none=True)
    p = 2
    feats = bm.head(p)(x)
    cut = feats.detach().requires_grad_(True)
    nn.functional.cross_entropy(bm.tail(p)(cut), y).backward()
    feats.backward(cut.grad)
    for k, param in bm.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[k])


def test_invalid_points_name_the_valid_ones():
    bm = BlockModel(blocks=[nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)], cut_points=[2])
    assert bm.cut_points == [0, 2, 3]
    with pytest.raises(ValueError, match=r"out of range 0\.\.3; valid points: \[0, 2, 3\]"):
        bm.head(4)
    with pytest.raises(ValueError, match=r"not a cut point.*\[0, 2, 3\]"):
        bm.tail(1)
    with pytest.raises(ValueError, match="out of range"):
        bm.head(-1)
    with pytest.raises(ValueError, match="must be an int"):
        bm.head(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        BlockModel(blocks=[nn.ReLU()], cut_points=[5])
    with pytest.raises(ValueError, match="at least one block"):
        BlockModel(blocks=[])


def test_empty_head_is_identity():
    bm = BlockModel.from_sequential(_seq())
    x = torch.randn(2, 6)
    assert bm.head(0)(x) is x
    assert list(bm.head(0).parameters()) == []


def test_from_module_finds_single_tensor_cuts_in_plain_residual_cnn():
    torch.manual_seed(0)
    net = PlainResidualCNN().eval()
    bm = BlockModel.from_module(net, torch.randn(1, 1, 8, 8)).eval()
    # stem | residual unit (conv_a, conv_b, add) | down (+mean) | head;
    # no cut inside the residual unit: two tensors are alive there
    assert bm.num_blocks == 4
    assert bm.cut_points == [0, 1, 2, 3, 4]
    assert bm.block_names == ["stem", "conv_a..conv_b", "down", "head"]
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(bm(x), net(x), rtol=0, atol=0)
    # parameters are the original module's tensors, under blocks.<i>.<original name>
    assert bm.blocks[1].conv_b.weight is net.conv_b.weight
    assert sorted(bm.tail(3).state_dict()) == ["blocks.3.head.bias", "blocks.3.head.weight"]
    # the cut after the residual unit carries 8x8x8, after `down` only 16 floats
    assert bm.head(2)(x).shape == (3, 8, 8, 8)
    assert bm.head(3)(x).shape == (3, 16)


class TupleCrossing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        out = self.lstm(x)  # a tuple crosses here: not a cut
        return self.fc(out[0][:, -1])


class SharedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.mid(self.fc(x)))  # fc used on both sides of `mid`


def test_from_module_rejects_tuple_and_shared_weight_cuts():
    bm = BlockModel.from_module(TupleCrossing(), torch.randn(2, 3, 4))
    assert bm.num_blocks == 2  # lstm+getitems | fc
    x = torch.randn(2, 3, 4)
    assert bm.head(1)(x).shape == (2, 5)
    shared = BlockModel.from_module(SharedWeights(), torch.randn(2, 4))
    assert shared.num_blocks == 1
    assert shared.cut_points == [0, 1]


def test_from_module_untraceable_gives_clear_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ValueError, match="could not trace DataDependent"):
        BlockModel.from_module(DataDependent(), torch.randn(2))
