"""Optimizer and learning-rate schedule, shared by the device and the cloud.

Both sides of a split model must follow the *same* schedule, or the head and the
tail drift apart. Instead of two schedulers that each count epochs (and can miss
one when a frame is lost or a step is replayed late), the learning rate is a pure
function of the epoch, and every step's update uses the lr of the epoch that
step belongs to (carried in its ``Features`` frame). A replayed step therefore
gets the same lr on both sides whatever the delay.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
#: Bounds on what a peer may ask for; far beyond any real recipe.
MAX_EPOCHS = 1_000_000
MAX_LR = 100.0


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class OptimizerConfig:
    """What both sides need to build identical optimizers."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    epochs: int = 1  # the schedule's horizon
    step_gamma: float = 0.1  # "step": multiply by gamma every step_every epochs
    step_every: int = 30

    def __post_init__(self) -> None:
        # The cloud builds this from a peer's JSON, so every field is checked for
        # type and range here: a bad value must be refused at Hello, not surface
        # later as a TypeError inside torch.optim or a ZeroDivisionError at step 1.
        _expect(
            isinstance(self.name, str) and self.name in OPTIMIZERS,
            f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}",
        )
        _expect(
            isinstance(self.schedule, str) and self.schedule in SCHEDULES,
            f"unknown lr schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}",
        )
        _expect(_is_real(self.lr) and 0 < self.lr <= MAX_LR, f"learning rate must be a number in (0, {MAX_LR}], got {self.lr!r}")
        _expect(_is_real(self.momentum) and 0 <= self.momentum < 1, f"momentum must be a number in [0, 1), got {self.momentum!r}")
        _expect(
            _is_real(self.weight_decay) and 0 <= self.weight_decay <= 1,
            f"weight decay must be a number in [0, 1], got {self.weight_decay!r}",
        )
        _expect(
            _is_int(self.epochs) and 1 <= self.epochs <= MAX_EPOCHS,
            f"epochs must be an integer in [1, {MAX_EPOCHS}], got {self.epochs!r}",
        )
        _expect(
            _is_real(self.step_gamma) and 0 < self.step_gamma <= 1,
            f"step_gamma must be a number in (0, 1], got {self.step_gamma!r}",
        )
        _expect(
            _is_int(self.step_every) and 1 <= self.step_every <= MAX_EPOCHS,
            f"step_every must be an integer in [1, {MAX_EPOCHS}], got {self.step_every!r}",
        )

    @property
    def state_keys(self) -> frozenset[str]:
        """The per-parameter optimizer state torch keeps once a parameter has stepped."""
        if self.name == "sgd":
            return frozenset({"momentum_buffer"}) if self.momentum > 0 else frozenset()
        return frozenset({"step", "exp_avg", "exp_avg_sq"})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OptimizerConfig:
        try:
            data = json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"optimizer config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("optimizer config must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown optimizer config keys: {sorted(unknown)}")
        return cls(**data)

    def lr_at(self, epoch: int) -> float:
        """Learning rate for every step of ``epoch`` (0-based).

        Raises ``ValueError`` for an epoch outside ``[0, MAX_EPOCHS]`` (a peer's
        claim; the "step" schedule would otherwise underflow or overflow)."""
        if not (_is_int(epoch) and 0 <= epoch <= MAX_EPOCHS):
            raise ValueError(f"epoch must be an integer in [0, {MAX_EPOCHS}], got {epoch!r}")
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":
            return self.lr * self.step_gamma ** (epoch // self.step_every)
        # cosine over the horizon, constant per epoch
        e = min(max(epoch, 0), self.epochs)
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * e / self.epochs))


def build_optimizer(params: Iterable[torch.Tensor], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def warm_up() -> None:
    """Pay torch.optim's lazy start-up cost now.

    Building the first optimizer imports ``torch._dynamo`` (about 2.5 s here).
    Servers call this before they accept connections and the device before its
    progress bar starts, so the first step's latency is not charged for it.
    """
    build_optimizer([torch.zeros(1, requires_grad=True)], OptimizerConfig())
