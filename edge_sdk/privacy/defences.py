"""Defences at the cut: what the device does to its features before they leave.

Two defences, both applied by the device in Python on the head's *output*, so
they hold whatever runs the head (eager PyTorch, TorchScript or an ExecuTorch
program: every runtime hands its features to :class:`edge_sdk.pipeline.EdgePipeline`
before they are encoded):

* **Gaussian noise** (``noise``): ``f + N(0, sigma^2)`` with ``sigma = s x rms(f)``
  of the first batch at the cut (:class:`FeatureNoise`), so one setting means the
  same at every cut. Fixed, not re-measured per batch: a sigma that followed each
  batch's scale would reward the head for growing its features within a step, and
  they grew until training diverged (measured: digits p=3, s=1, NaN in epoch 4).
  The noise is additive, so the gradient the cloud returns for the noisy features
  is applied to the head unchanged; the attack measurement shows how much of the
  protection survives the head growing its features over a run.
* **NoPeek** (``nopeek``, Vepakomma et al. 2020): the head also minimises
  ``alpha * dcor(x, f)``, the distance correlation between the raw inputs of a
  batch and their features, which makes the features carry less of the input's
  geometry. Its gradient with respect to ``f`` is added to the cloud's feature
  gradient before the head's backward pass, so a program runtime (whose backward
  takes a feature gradient) applies it too.

Neither changes what the cloud runs or what crosses the wire besides the values,
so a defended run talks to an ordinary server.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

__all__ = ["CutDefence", "FeatureNoise", "distance_correlation"]


def distance_correlation(x: torch.Tensor, z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Sample distance correlation of two batches (rows are samples), in [0, 1].

    Székely's statistic on double-centred pairwise distance matrices; tested
    against the ``dcor`` package. Differentiable in both arguments."""
    n = x.shape[0]
    a = torch.cdist(x.reshape(n, -1), x.reshape(n, -1))
    b = torch.cdist(z.reshape(n, -1), z.reshape(n, -1))
    a = a - a.mean(dim=0, keepdim=True) - a.mean(dim=1, keepdim=True) + a.mean()
    b = b - b.mean(dim=0, keepdim=True) - b.mean(dim=1, keepdim=True) + b.mean()
    dcov2_xy = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()
    return torch.sqrt(torch.clamp(dcov2_xy, min=0.0) / torch.sqrt(dvar2).clamp(min=eps) + eps)


class FeatureNoise:
    """Gaussian noise of ``relative`` x the RMS of the first batch it sees, then fixed.

    Its own generator keeps the noise from shifting the global RNG stream that
    dropout masks and batch order come from."""

    def __init__(self, relative: float, seed: int, sigma: float | None = None) -> None:
        self.relative = relative
        self.sigma = sigma
        self.generator = torch.Generator().manual_seed(seed)

    def with_seed(self, seed: int) -> FeatureNoise:
        """The same sigma from another stream (the attack draws its own noise)."""
        return FeatureNoise(self.relative, seed, self.sigma)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        if self.relative <= 0:
            return feats
        if self.sigma is None:
            self.sigma = self.relative * float(feats.detach().float().pow(2).mean().sqrt())
        noise = torch.randn(feats.shape, generator=self.generator, dtype=feats.dtype, device=feats.device)
        return feats + self.sigma * noise


@dataclass(frozen=True)
class CutDefence:
    """The defences a run applies at its cut; the default applies none."""

    noise: float = 0.0  # Gaussian noise sigma, relative to the batch's feature RMS
    nopeek: float = 0.0  # weight of the distance-correlation penalty on the head

    def __post_init__(self) -> None:
        for name, value in (("noise", self.noise), ("nopeek", self.nopeek)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"defence {name} must be a finite number >= 0, got {value}")

    @property
    def active(self) -> bool:
        return self.noise > 0 or self.nopeek > 0

    @property
    def label(self) -> str:
        """Short name, the key of a privacy measurement: ``none``, ``noise=0.5``,
        ``nopeek=0.3`` or ``noise=0.5+nopeek=0.3``."""
        parts = [f"{name}={value:g}" for name, value in (("noise", self.noise), ("nopeek", self.nopeek)) if value > 0]
        return "+".join(parts) or "none"

    @classmethod
    def parse(cls, text: str) -> CutDefence:
        """The inverse of :attr:`label` (``none``, ``noise=S``, ``nopeek=A``, joined by ``+``)."""
        text = text.strip().lower()
        if text in ("", "none"):
            return cls()
        values: dict[str, float] = {}
        for part in text.split("+"):
            m = re.fullmatch(r"(noise|nopeek)=([0-9.eE+-]+)", part.strip())
            if m is None:
                raise ValueError(
                    f"defence {text!r}: expected none, noise=S, nopeek=A or both joined by '+', e.g. noise=0.5+nopeek=0.2"
                )
            try:
                values[m.group(1)] = float(m.group(2))
            except ValueError:
                raise ValueError(f"defence {text!r}: {m.group(2)!r} is not a number") from None
        return cls(**values)

    # -- what the device applies ----------------------------------------------

    def noise_source(self, seed: int) -> FeatureNoise:
        """The noise the device adds at one cut (a new cut needs a new one)."""
        return FeatureNoise(self.noise, seed)

    def penalty(self, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """``nopeek x dcor(x, feats)`` (a scalar to add to the loss); 0 without NoPeek."""
        if self.nopeek <= 0 or x.shape[0] < 2:
            return feats.new_zeros(())
        return self.nopeek * distance_correlation(x.detach().float(), feats)

    def penalty_gradient(self, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor | None:
        """d penalty / d feats for features already computed (the head's graph is
        not needed: the result is added to the cloud's feature gradient)."""
        if self.nopeek <= 0 or x.shape[0] < 2:
            return None
        f = feats.detach().float().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.penalty(x, f), f)
        return grad.to(feats.dtype)
