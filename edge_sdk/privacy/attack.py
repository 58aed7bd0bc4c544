"""The feature-inversion attack: how well can the cloud rebuild inputs from cut features?

Threat model (a conservative one, as in He et al. 2019 "Model inversion attacks
against collaborative inference"): an honest-but-curious cloud holds *public*
data from the same distribution as the device's (a split disjoint from the
device's private data) and can obtain the head's features for it — the trained
head leaked, or the device processes public samples too. It trains a decoder
``features -> input`` on those pairs and applies it to the features the device
uploads for its private samples. The features go through the run's codec (and
the device's defences) first, exactly as they cross the wire.

The decoder is a generic MLP on standardized, flattened features: a fixed,
reproducible attacker rather than the strongest possible one, so the reported
PSNR is a lower bound on what a determined attacker achieves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Reconstruction:
    """Scores of reconstructions against the private originals."""

    mse: float
    psnr_db: float
    ssim: float

    def to_dict(self) -> dict[str, float]:
        return {"mse": self.mse, "psnr_db": self.psnr_db, "ssim": self.ssim}


def psnr_db(mse: float, data_range: float) -> float:
    """Peak signal-to-noise ratio of a mean squared error for data spanning ``data_range``."""
    return 10.0 * math.log10(data_range**2 / max(mse, 1e-12))


def score(originals: torch.Tensor, reconstructions: torch.Tensor, data_range: float) -> Reconstruction:
    """MSE, PSNR and SSIM (scikit-image's, per sample, averaged) of a batch."""
    from skimage.metrics import structural_similarity

    a = originals.detach().float().numpy()
    b = reconstructions.detach().float().numpy()
    mse = float(np.mean((a - b) ** 2))
    ssims = []
    for xa, xb in zip(a, b, strict=True):
        ia, ib = np.squeeze(xa), np.squeeze(xb)  # (1, H, W) -> (H, W); (1, L) -> (L,)
        win = min(7, *(d if d % 2 else d - 1 for d in ia.shape))
        ssims.append(structural_similarity(ia, ib, data_range=data_range, win_size=max(win, 3)))
    return Reconstruction(mse=mse, psnr_db=psnr_db(mse, data_range), ssim=float(np.mean(ssims)))


class InversionDecoder(nn.Module):
    """features -> input: an MLP on standardized, flattened cut features."""

    mean: torch.Tensor  # buffers: the public features' per-element statistics
    std: torch.Tensor

    def __init__(self, feature_numel: int, input_shape: tuple[int, ...], hidden: int = 256) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        out = math.prod(input_shape)
        self.register_buffer("mean", torch.zeros(feature_numel))
        self.register_buffer("std", torch.ones(feature_numel))
        self.net = nn.Sequential(
            nn.Linear(feature_numel, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        f = (feats.reshape(feats.shape[0], -1) - self.mean) / self.std
        return self.net(f).reshape(feats.shape[0], *self.input_shape)


def train_decoder(
    public_feats: torch.Tensor,
    public_inputs: torch.Tensor,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    holdout: float = 0.15,
) -> InversionDecoder:
    """Fit a decoder on the attacker's (features, input) pairs.

    ``holdout`` of the public pairs select the best checkpoint (the attacker can
    do that: it is its own data), so a long schedule does not overfit the few
    hundred samples a small dataset gives."""
    gen = torch.Generator().manual_seed(seed)
    n = public_feats.shape[0]
    order = torch.randperm(n, generator=gen)
    n_val = max(1, int(n * holdout))
    val, fit = order[:n_val], order[n_val:]
    feats = public_feats.detach().float().reshape(n, -1)
    inputs = public_inputs.detach().float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = InversionDecoder(feats.shape[1], tuple(inputs.shape[1:]))
    decoder.mean.copy_(feats[fit].mean(dim=0))
    # a feature (nearly) constant on the public data must not blow up on private
    # data: its scale is floored at a tenth of the typical feature's
    std = feats[fit].std(dim=0)
    decoder.std.copy_(std.clamp(min=max(0.1 * float(std.mean()), 1e-6)))
    opt = torch.optim.Adam(decoder.parameters(), lr=lr, weight_decay=1e-5)
    best_loss, best_state = math.inf, None
    for step in range(steps):
        idx = fit[torch.randint(len(fit), (min(batch_size, len(fit)),), generator=gen)]
        loss = nn.functional.mse_loss(decoder(feats[idx]), inputs[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 49 or step == steps - 1:
            with torch.no_grad():
                val_loss = float(nn.functional.mse_loss(decoder(feats[val]), inputs[val]))
            if val_loss < best_loss:
                best_loss, best_state = val_loss, {k: v.clone() for k, v in decoder.state_dict().items()}
    if best_state is not None:
        decoder.load_state_dict(best_state)
    decoder.eval()
    return decoder


def mean_input_baseline(public_inputs: torch.Tensor, private_inputs: torch.Tensor, data_range: float) -> Reconstruction:
    """The score of an attacker who ignores the features and answers the mean
    public input: what "learned nothing" looks like."""
    mean = public_inputs.float().mean(dim=0, keepdim=True).expand_as(private_inputs)
    return score(private_inputs, mean, data_range)
