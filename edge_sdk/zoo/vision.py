"""VGG-19 and MobileNetV3-Large for CIFAR-10, as explicit block lists.

Both are written here because torchvision does not import beside our torch build.
Blocks are "one conv (+BN +activation), with a following pool folded in", so every
layer boundary is a partition point.
"""

from __future__ import annotations

from torch import nn

from edge_sdk.blocks import BlockModel

# VGG-19 configuration "E" (Simonyan & Zisserman, 2015); "M" = 2x2 max-pool.
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def vgg19(num_classes: int = 10, batch_norm: bool = True) -> BlockModel:
    """VGG-19 for 32x32 inputs (the common CIFAR variant: BN after every conv,
    a single 512->classes linear head; 20,040,522 parameters at 10 classes)."""
    blocks: list[nn.Module] = []
    in_ch = 3
    for v in _VGG19:
        if v == "M":
            blocks[-1].append(nn.MaxPool2d(2))
            continue
        layer = nn.Sequential(nn.Conv2d(in_ch, v, 3, padding=1))
        if batch_norm:
            layer.append(nn.BatchNorm2d(v))
        layer.append(nn.ReLU())
        blocks.append(layer)
        in_ch = v
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes)))
    names = [f"conv{i + 1}" for i in range(len(blocks) - 1)] + ["classifier"]
    return BlockModel(blocks, block_names=names)


# ------------------------------------------------------------- MobileNetV3
def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.relu = nn.ReLU()
        self.hsigmoid = nn.Hardsigmoid()

    def forward(self, x):
        s = self.hsigmoid(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * s


def _conv_bn_act(
    in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.Hardswish
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch, eps=0.001, momentum=0.01),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, k: int, exp: int, out_ch: int, use_se: bool, act: str, stride: int) -> None:
        super().__init__()
        act_layer = nn.Hardswish if act == "HS" else nn.ReLU
        self.use_res = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if exp != in_ch:
            layers.append(_conv_bn_act(in_ch, exp, 1, act=act_layer))
        layers.append(_conv_bn_act(exp, exp, k, stride, groups=exp, act=act_layer))
        if use_se:
            layers.append(SqueezeExcitation(exp, _make_divisible(exp // 4)))
        layers.append(_conv_bn_act(exp, out_ch, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res else out


# (in, kernel, expanded, out, SE, activation, stride) - Howard et al. 2019, Table 1
_MBV3_LARGE = [
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2),
    (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
]


def mobilenetv3_large(num_classes: int = 10, stem_stride: int = 1, dropout: float = 0.2) -> BlockModel:
    """MobileNetV3-Large (Howard et al., 2019) laid out like torchvision's (so it has
    torchvision's 5,483,032 parameters at 1000 classes). ``stem_stride=1`` is the
    CIFAR variant (32x32 inputs end at 2x2 instead of 1x1)."""
    blocks: list[nn.Module] = [_conv_bn_act(3, 16, 3, stem_stride)]
    for cfg in _MBV3_LARGE:
        blocks.append(InvertedResidual(*cfg))
    blocks.append(_conv_bn_act(160, 960, 1))
    blocks.append(
        nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(960, 1280),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(1280, num_classes),
        )
    )
    names = ["stem"] + [f"bneck{i + 1}" for i in range(len(_MBV3_LARGE))] + ["last_conv", "classifier"]
    return BlockModel(blocks, block_names=names)
