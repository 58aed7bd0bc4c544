"""Measuring what each (cut point, codec, defence) reveals, and what the defence costs.

For each cut point and defence a model is trained on the device's *private*
split with the defence applied at that cut (``z = head(x)``; the tail sees
``z`` plus the defence's noise; the head also pays ``nopeek x dcor(x, z)``): the same update split
training computes, without the link (feature replay changes when a gradient is
applied, not what the head learns to emit). Without a defence one model serves
every cut. The attacker's decoder (:mod:`edge_sdk.privacy.attack`) is then fit on
the *public* split's features, after the codec, and scored on private samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from edge_sdk import zoo
from edge_sdk.data import load as load_dataset
from edge_sdk.optim import OptimizerConfig, build_optimizer, set_lr
from edge_sdk.privacy.attack import Reconstruction, mean_input_baseline, score, train_decoder
from edge_sdk.privacy.defences import CutDefence, FeatureNoise
from schemas import codecs

#: the attacker's share of the training split (disjoint from the device's private data)
PUBLIC_FRACTION = 0.3
#: private samples the reconstructions are scored on
SCORED_SAMPLES = 512


@dataclass
class PrivacyConfig:
    """One privacy measurement: which cuts, codecs and defences, trained how."""

    model: str
    dataset: str
    points: Sequence[int] | None = None  # None: every interior cut
    codecs: Sequence[str] = ("fp32", "int8")
    defences: Sequence[CutDefence] = (CutDefence(),)
    epochs: int | None = None  # None: the dataset recipe's
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    seed: int = 0
    public_fraction: float = PUBLIC_FRACTION
    attack_steps: int = 1000
    data_dir: str | None = None


@dataclass
class Measurement:
    """What one (point, codec, defence) gives away, and what its training reached."""

    point: int
    codec: str
    defence: str
    attack: Reconstruction
    test_accuracy: float
    train_s: float
    #: device time per step spent on the defence, and on the head's forward + backward
    defence_ms: float
    head_ms: float
    diverged: bool = False  # the training loss went non-finite: the defence broke training

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": self.point,
            "codec": self.codec,
            "defence": self.defence,
            **self.attack.to_dict(),
            "test_accuracy": self.test_accuracy,
            "train_s": self.train_s,
            "defence_ms_per_step": self.defence_ms,
            "head_ms_per_step": self.head_ms,
            "training_diverged": self.diverged,
        }


@dataclass
class PrivacyReport:
    config: PrivacyConfig
    baseline: Reconstruction  # the attacker who answers the mean public input
    data_range: float
    public_samples: int
    private_samples: int
    measurements: list[Measurement] = field(default_factory=list)
    #: (point, defence) -> a few private originals and their reconstructions (first codec)
    examples: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "kind": "splitreplay-privacy-profile",
            "version": 1,
            "model": c.model,
            "dataset": c.dataset,
            "seed": c.seed,
            "epochs": c.epochs,
            "threat_model": (
                "honest-but-curious cloud with a public split of the same distribution and the trained head's "
                "features for it; MLP decoder features -> input, scored on private samples it never saw"
            ),
            "public_samples": self.public_samples,
            "private_samples_scored": self.private_samples,
            "data_range": self.data_range,
            "baseline_mean_input": self.baseline.to_dict(),
            "results": [m.to_dict() for m in self.measurements],
        }


def split_private_public(train: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """A fixed, disjoint (private, public) split of the training data."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the public fraction must be in (0, 1), got {fraction}")
    n = len(train)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed)).tolist()
    n_public = max(2, int(n * fraction))
    return Subset(train, order[n_public:]), Subset(train, order[:n_public])


def stack(ds: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=512):
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def train_with_defence(
    spec: zoo.ModelSpec,
    private: Dataset,
    test: Dataset,
    point: int,
    defence: CutDefence,
    cfg: PrivacyConfig,
    epochs: int,
    on_step: Callable[[], None] | None = None,
) -> tuple[float, float, FeatureNoise, bool]:
    """Train ``spec.model`` on ``private`` with ``defence`` at cut ``point``;
    returns (test accuracy with the defence on, seconds, the noise it trained
    with, whether the loss diverged)."""
    torch.manual_seed(cfg.seed)
    model = spec.model
    head, tail = model.head(point), model.tail(point)
    opt_cfg = OptimizerConfig(name=cfg.optimizer, lr=cfg.lr, epochs=epochs)
    opt = build_optimizer(list(model.parameters()), opt_cfg)
    noise = defence.noise_source(cfg.seed)
    diverged = False
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if diverged:
            break
        model.train()
        set_lr(opt, opt_cfg.lr_at(epoch))
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        for x, y in DataLoader(private, batch_size=cfg.batch_size, shuffle=True, generator=g):
            z = head(x)
            loss, _ = spec.loss(tail(noise(z)), y)
            loss = loss + defence.penalty(x, z)
            if not math.isfinite(float(loss.detach())):
                diverged = True  # reported as such: the defence broke training
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step()
    seconds = time.perf_counter() - t0
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=512):
            _, c = spec.loss(tail(noise(head(x))), y)
            correct += int(c)
            count += len(y)
    return correct / max(count, 1), seconds, noise, diverged


def wire_features(spec: zoo.ModelSpec, point: int, x: torch.Tensor, codec: str, noise: FeatureNoise) -> torch.Tensor:
    """The features of ``x`` as the cloud receives them: head (eval mode), the
    device's defence, then the codec's encode and decode."""
    head = spec.model.head(point)
    spec.model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], 256):
            feats = noise(head(x[i : i + 256]))
            frame, _ = codecs.encode_tensor(feats, codec)
            out.append(codecs.decode_tensor(frame).float())
    return torch.cat(out)


def defence_cost_ms(
    spec: zoo.ModelSpec, point: int, x: torch.Tensor, defence: CutDefence, repeats: int = 5
) -> tuple[float, float]:
    """(defence ms, head forward + backward ms) per step on one batch, measured
    here: the device's extra compute for the defence, next to what it already spends."""
    head = spec.model.head(point)
    spec.model.train()
    noise = defence.noise_source(0)

    def head_step() -> torch.Tensor:
        z = head(x)
        z.backward(torch.ones_like(z))
        return z.detach()

    def defence_step(z: torch.Tensor) -> None:
        noise(z)
        defence.penalty_gradient(x, z)

    head_ts, def_ts = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        z = head_step()
        t1 = time.perf_counter()
        defence_step(z)
        t2 = time.perf_counter()
        head_ts.append(t1 - t0)
        def_ts.append(t2 - t1)
    spec.model.zero_grad(set_to_none=True)
    return 1e3 * sorted(def_ts[1:])[repeats // 2], 1e3 * sorted(head_ts[1:])[repeats // 2]


def measure(cfg: PrivacyConfig, progress: Callable[[int], Callable[[int], None]] | None = None) -> PrivacyReport:
    """Run every (point, defence) training and every (point, codec, defence) attack.

    ``progress(total)`` is called once up front with the work to do (training
    steps plus decoder steps) and returns ``advance(n)``; None for silence."""
    from edge_sdk.zoo.recipes import RECIPES

    splits = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed)
    probe = zoo.build(cfg.model, seed=cfg.seed)
    if tuple(splits.input_shape) != tuple(probe.input_shape):
        raise ValueError(
            f"model {cfg.model} expects inputs of shape {tuple(probe.input_shape)}, "
            f"dataset {cfg.dataset} gives {tuple(splits.input_shape)}"
        )
    if probe.input_dtype != torch.float32:
        raise ValueError(f"the inversion attack rebuilds real-valued inputs; {cfg.model} takes {probe.input_dtype} ids")
    interior = probe.model.interior_points
    points = list(interior if cfg.points is None else cfg.points)
    bad = [p for p in points if p not in interior]
    if bad:
        raise ValueError(f"cut points {bad} are not interior cuts of {cfg.model}; valid: {interior}")
    for c in cfg.codecs:
        codecs.Codec.parse(c)  # raises with the valid choices
    recipe = RECIPES.get(cfg.model)
    epochs = cfg.epochs if cfg.epochs is not None else (recipe.epochs if recipe else 10)

    private, public = split_private_public(splits.train, cfg.public_fraction, cfg.seed)
    x_pub, _ = stack(public)
    x_priv, _ = stack(private, SCORED_SAMPLES)
    data_range = float(max(x_pub.max(), x_priv.max()) - min(x_pub.min(), x_priv.min()))
    report = PrivacyReport(
        config=cfg,
        baseline=mean_input_baseline(x_pub, x_priv, data_range),
        data_range=data_range,
        public_samples=len(public),
        private_samples=int(x_priv.shape[0]),
    )
    # one undefended model serves every cut; a defence is trained per cut
    trainings: list[tuple[tuple[int, ...], CutDefence]] = []
    for d in cfg.defences:
        trainings += [((p,), d) for p in points] if d.active else [(tuple(points), d)]
    steps_per_epoch = math.ceil(len(private) / cfg.batch_size)
    attacks = len(points) * len(cfg.codecs) * len(cfg.defences)
    advance = progress(len(trainings) * epochs * steps_per_epoch + attacks * cfg.attack_steps) if progress else None
    tick = (lambda: advance(1)) if advance else None
    batch = x_priv[: cfg.batch_size]
    for cut_points, defence in trainings:
        spec = zoo.build(cfg.model, seed=cfg.seed)
        # an undefended model is the same at every cut: train it at the first
        accuracy, seconds, noise, diverged = train_with_defence(
            spec, private, splits.test, cut_points[0], defence, cfg, epochs, tick
        )
        for p in cut_points:
            defence_ms, head_ms = defence_cost_ms(spec, p, batch, defence)
            for i, codec in enumerate(cfg.codecs):
                pub_feats = wire_features(spec, p, x_pub, codec, noise.with_seed(cfg.seed + 7))
                priv_feats = wire_features(spec, p, x_priv, codec, noise.with_seed(cfg.seed + 8))
                decoder = train_decoder(pub_feats, x_pub, steps=cfg.attack_steps, seed=cfg.seed)
                with torch.no_grad():
                    rebuilt = decoder(priv_feats)
                if advance is not None:
                    advance(cfg.attack_steps)
                report.measurements.append(
                    Measurement(
                        point=p,
                        codec=codecs.Codec.parse(codec).label,
                        defence=defence.label,
                        attack=score(x_priv, rebuilt, data_range),
                        test_accuracy=accuracy,
                        train_s=seconds,
                        defence_ms=defence_ms,
                        head_ms=head_ms,
                        diverged=diverged,
                    )
                )
                if i == 0:
                    report.examples[(p, defence.label)] = (x_priv[:8].clone(), rebuilt[:8].clone())
    return report
