"""Up-convolutional chair generator (after Dosovitskiy et al., "Learning to
Generate Chairs with Convolutional Neural Networks", CVPR 2015).

Input: one float vector per sample, the concatenation ``[class one-hot (809),
view (4: sin/cos of azimuth and elevation), transform parameters (12)]`` - one
tensor so the first cut is single-tensor like every other. Output: (4, 128, 128),
channels 0-2 the RGB image (in [0, 1] after a sigmoid, applied in the loss), channel
3 the segmentation-mask logit. The usual placement is *edge tail*: the device keeps
the target images and runs the last up-convolutions and the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from edge_sdk.blocks import BlockModel


class InputFusion(nn.Module):
    """Separate FC streams for class, view and transform, concatenated (paper, Fig. 2)."""

    def __init__(self, class_dim: int, view_dim: int, transform_dim: int) -> None:
        super().__init__()
        self.dims = (class_dim, view_dim, transform_dim)
        self.fc_class = nn.Sequential(nn.Linear(class_dim, 512), nn.LeakyReLU(0.2), nn.Linear(512, 512), nn.LeakyReLU(0.2))
        self.fc_view = nn.Sequential(nn.Linear(view_dim, 512), nn.LeakyReLU(0.2), nn.Linear(512, 512), nn.LeakyReLU(0.2))
        self.fc_transform = nn.Sequential(nn.Linear(transform_dim, 512), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, v, t = torch.split(x, self.dims, dim=1)
        return torch.cat([self.fc_class(c), self.fc_view(v), self.fc_transform(t)], dim=1)


class Unflatten(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], *self.shape)


def _upconv(in_ch: int, out_ch: int) -> nn.Sequential:
    """2x up-convolution (transposed conv, stride 2) then a 3x3 conv."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(out_ch, out_ch, 3, padding=1),
        nn.LeakyReLU(0.2),
    )


def chair_generator(class_dim: int = 809, view_dim: int = 4, transform_dim: int = 12, width: int = 256) -> BlockModel:
    """FC fusion -> 1024 -> (w, 8, 8) -> four 2x up-convolutions -> (4, 128, 128)."""
    w = width
    blocks: list[nn.Module] = [
        InputFusion(class_dim, view_dim, transform_dim),
        nn.Sequential(nn.Linear(1536, 1024), nn.LeakyReLU(0.2), nn.Linear(1024, 1024), nn.LeakyReLU(0.2)),
        nn.Sequential(nn.Linear(1024, w * 8 * 8), nn.LeakyReLU(0.2), Unflatten((w, 8, 8))),
        _upconv(w, w // 2),  # 16x16
        _upconv(w // 2, w // 4),  # 32x32
        _upconv(w // 4, w // 8),  # 64x64
        nn.Sequential(
            nn.ConvTranspose2d(w // 8, w // 8, 4, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(w // 8, 4, 3, padding=1)
        ),  # 128x128, RGB + mask logit
    ]
    names = ["input_fusion", "fc3_fc4", "fc5_reshape", "uconv1", "uconv2", "uconv3", "uconv4_out"]
    return BlockModel(blocks, block_names=names)


def generator_loss(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """MSE on the sigmoid RGB image + BCE on the mask logit (the paper's squared
    error on image and mask, with BCE for the binary mask). Target: (B, 4, H, W),
    RGB in [0, 1] and mask in {0, 1}. ``correct`` is 0: there is no accuracy."""
    rgb = torch.sigmoid(output[:, :3])
    loss = nn.functional.mse_loss(rgb, target[:, :3]) + nn.functional.binary_cross_entropy_with_logits(output[:, 3], target[:, 3])
    return loss, 0
