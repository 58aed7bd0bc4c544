"""Training configuration, results, and the local pieces of a run (model, data, head).

Kept apart from the WebSocket client so that the same configuration builds the
device head, the batches, and the JSON report whether the link is real, emulated,
or (in tests) absent.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch.utils.data import DataLoader

from edge_sdk import data as datasets
from edge_sdk import zoo
from edge_sdk.optim import OptimizerConfig, warm_up
from edge_sdk.privacy.defences import CutDefence
from edge_sdk.privacy.floor import PrivacyFloor, PrivacyProfile, exclusions
from schemas.frames import MAX_EVAL_BATCH

#: ``--point device``: the device trains the whole model alone
DEVICE_ONLY = "device"


@dataclass(frozen=True)
class CliOption:
    """How a `TrainConfig` field appears on the command line (`edge_sdk.train_cli`
    builds the parser from these, so the defaults live only here)."""

    help: str
    flag: str | None = None  # default: --field-name
    choices: Callable[[], Sequence[str]] | None = None
    parse: Callable[[str], Any] | None = None
    #: the default comes from the dataset's recipe (`edge_sdk.zoo.recipes`)
    recipe: bool = False
    shown: str | None = None  # the default as the user types it, when it differs
    metavar: str | None = None


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"cli": CliOption(help, **kw)})


def parse_point(text: str) -> int | str | None:
    """``auto`` (None), ``device`` or a block index."""
    return text if text == DEVICE_ONLY else parse_auto_int(text)


def parse_auto_int(text: str) -> int | None:
    """``auto`` (None) or an integer."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def _codecs() -> Sequence[str]:
    from schemas.codecs import LABELS

    return LABELS


def _runtimes() -> Sequence[str]:
    from edge_sdk.runtime import RUNTIMES

    return RUNTIMES


@dataclass
class TrainConfig:
    """Everything a device needs to start a training run (and the cloud to mirror it).

    Fields with a `CliOption` are the ``train``/``emulate`` flags."""

    model: str = _opt("digits_cnn", "zoo model", choices=zoo.names, recipe=True)
    dataset: str = _opt("digits", "dataset; digits and mnist1d are bundled, the others need --data-dir", choices=datasets.names)
    data_dir: str | None = _opt(None, "folder holding a real dataset's files", metavar="DIR")
    epochs: int = _opt(10, "passes over the training split", recipe=True)
    batch_size: int = _opt(32, "samples per step", recipe=True)
    #: None: auto (start at the model's default cut); "device" (or the block count):
    #: train the whole model on the device, the cloud keeping the session
    point: int | str | None = _opt(
        None,
        "partition point p: blocks [0,p) run on the device; 'device' (or the block count) trains the whole model "
        "on the device alone; 'auto' lets the decision engine choose and move it, device-only included",
        parse=parse_point,
        shown="auto",
        metavar="{auto,device,P}",
    )
    auto_point: bool = True  # let the decision engine move the cut (only when point is None)
    #: whether the engine may choose device-only training (labels stay on the device)
    allow_device_only: bool = _opt(
        True, "with --point auto: never let the engine train on the device alone", flag="--no-device-only"
    )
    codec: str = _opt("auto", "feature codec on the way up; auto lets the engine pick", choices=lambda: ("auto", *_codecs()))
    grad_codec: str = _opt("fp16", "gradient codec on the way down", choices=_codecs)
    staleness: int | None = _opt(
        None,
        "K: steps allowed in flight beyond the current one; 0 = sequential; 'auto' sizes it to fill the pipe",
        parse=parse_auto_int,
        shown="auto",
        metavar="{auto,K}",
    )
    max_staleness: int = _opt(8, "the largest K the engine may pick")
    memory_budget_bytes: int | None = None
    decide_after: int = 10  # steps of measurement before the first decision
    decide_every: int = 10
    error_feedback: bool = _opt(True, "turn off the g - E*g*g correction (ablation)")
    #: cap stale head-gradient norms (K > 0); see pipeline.StalenessGuard
    staleness_guard: bool = _opt(True, "do not cap stale head-gradient norms (ablation)")
    optimizer: str = _opt("sgd", "optimizer, the same on both sides", choices=lambda: ("sgd", "adam", "adamw"), recipe=True)
    lr: float = _opt(0.05, "peak learning rate", recipe=True)
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(0.0, "weight decay")
    schedule: str = _opt(
        "cosine", "per-epoch lr schedule, identical on both sides", choices=lambda: ("constant", "cosine", "step")
    )
    seed: int = _opt(0, "model init, batch order and dropout seed")
    runtime: str = _opt(
        "eager", "how the device runs its head: eager PyTorch, or programs from `python -m export`", choices=_runtimes
    )
    programs: str | None = _opt(
        None, "folder of exported head programs (with manifest.json) for --runtime executorch|torchscript", metavar="DIR"
    )
    device_slowdown: float = _opt(1.0, "emulate a device S times slower than this machine", metavar="S")
    token: str = _opt("", "shared secret if the server was started with --token", shown="none")
    #: CA bundle to trust for wss:// (e.g. a self-signed server certificate)
    tls_ca: str | None = _opt(
        None, "CA certificate (PEM) to trust for a wss:// server, e.g. its self-signed certificate", metavar="PEM"
    )
    reconnect_timeout_s: float = _opt(
        300.0,
        "after a dropped connection, keep re-dialling (backoff with jitter) this many seconds, then resume "
        "the session where it stopped; 0: a drop ends the run",
        flag="--reconnect-timeout",
        metavar="S",
    )
    save_model: str | None = _opt(
        None,
        "at the end, bring the tail to the device and write the whole trained model here (.safetensors; its zoo "
        "config goes beside it as .json; `python -m edge_sdk evaluate --model-file` reads them)",
        metavar="PATH",
    )
    checkpoint_dir: str | None = _opt(
        None,
        "save the device's state here at the points agreed with the cloud (each epoch end and every "
        "--checkpoint-every steps; the cloud needs `serve --state-dir`), so --resume can continue the run "
        "after this process died",
        metavar="DIR",
    )
    checkpoint_every: int = _opt(
        500,
        "with a cloud that keeps checkpoints: also checkpoint every N steps inside an epoch (0: only at epoch ends); "
        "each one drains the steps in flight",
        metavar="N",
    )
    resume: bool = _opt(
        False,
        "continue the run saved in --checkpoint-dir (after a crash, a kill or Ctrl-C) from its newest checkpoint; "
        "the run's configuration comes from the checkpoint",
    )
    max_steps_per_epoch: int | None = _opt(None, "cut each epoch short (smoke runs)", shown="the whole epoch", metavar="N")
    #: benchmarks: stop after this many seconds of training (the report says ``stopped_early``)
    max_train_s: float | None = None
    eval_batch_size: int = MAX_EVAL_BATCH  # the cloud refuses larger eval batches (unless batch_size is larger)
    evaluate: bool = True  # run the test split through the link after every epoch
    topk_ratio: float = _opt(0.1, "share of elements the topk codec keeps")
    defence: str = _opt(
        "none",
        "what the device does to its cut features before they leave: none, noise=S (Gaussian noise, S x the "
        "feature RMS), nopeek=A (a distance-correlation penalty of weight A on the head), or both joined by '+'; "
        "`python -m edge_sdk privacy` measures what each buys",
        metavar="D",
    )
    privacy_profile: str | None = _opt(
        None, "privacy.json from `python -m edge_sdk privacy` (the attack PSNR per point, codec, defence)", metavar="JSON"
    )
    privacy_floor: str | None = _opt(
        None,
        "psnr=P: never use a (point, codec) whose measured attack PSNR with this run's --defence is above P dB "
        "(needs --privacy-profile; unmeasured ones are ruled out too); depth=N: keep at least N blocks on the "
        "device; training alone always qualifies",
        metavar="psnr=P|depth=N",
    )

    @classmethod
    def from_recipe(cls, **given: Any) -> TrainConfig:
        """A configuration whose model, epochs, batch size, optimizer and lr come from
        the dataset's recipe (`edge_sdk.zoo.recipes`) unless given; ``None`` counts
        as not given. Without a recipe the given model is required."""
        from edge_sdk.zoo.recipes import RECIPES, recipe_for_dataset

        dataset = given.get("dataset") or cls.dataset
        given = {k: v for k, v in given.items() if not (v is None and k in _RECIPE_FIELDS)}
        try:
            model, recipe = recipe_for_dataset(dataset)
        except ValueError:
            if given.get("model") is None:
                raise
            model, recipe = given["model"], RECIPES.get(given["model"])
        base: dict[str, Any] = {"model": model}
        if recipe is not None:
            base |= dict(epochs=recipe.epochs, batch_size=recipe.batch_size, optimizer=recipe.optimizer, lr=recipe.lr)
        return cls(**{**base, **given})

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(
            name=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            epochs=self.epochs,
        )

    def __post_init__(self) -> None:
        if self.point is not None:
            self.auto_point = False

    @property
    def cut_defence(self) -> CutDefence:
        return CutDefence.parse(self.defence)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.save_model is not None and not self.save_model.endswith(".safetensors"):
            raise ValueError(f"--save-model {self.save_model}: the file name must end in .safetensors")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume continues the run saved in --checkpoint-dir DIR: give the folder")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 steps, got {self.checkpoint_every}")
        if not (self.reconnect_timeout_s >= 0 and math.isfinite(self.reconnect_timeout_s)):
            raise ValueError(f"--reconnect-timeout must be >= 0 seconds, got {self.reconnect_timeout_s}")
        if self.staleness is not None and self.staleness < 0:
            raise ValueError(f"--staleness must be >= 0, got {self.staleness}")
        if not (self.device_slowdown >= 1.0 and math.isfinite(self.device_slowdown)):
            raise ValueError(f"--device-slowdown must be >= 1 (1 = this machine's speed), got {self.device_slowdown}")
        self.optimizer_config()  # raises on a bad optimizer/lr
        self.cut_defence  # noqa: B018 (raises on a malformed --defence)
        if self.privacy_floor is not None:
            PrivacyFloor.parse(self.privacy_floor)
        elif self.privacy_profile is not None:
            raise ValueError("--privacy-profile is read for --privacy-floor psnr=P: give the floor too")
        from edge_sdk.runtime import RUNTIMES

        if self.runtime not in RUNTIMES:
            raise ValueError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.runtime != "eager" and not self.programs:
            raise ValueError(f"--runtime {self.runtime} needs --programs DIR (made by `python -m export`)")


#: fields whose default comes from the dataset's recipe
_RECIPE_FIELDS = frozenset(f.name for f in fields(TrainConfig) if "cli" in f.metadata and f.metadata["cli"].recipe)


@dataclass
class TrainResult:
    """The run's report; serialised as the ``--json`` output."""

    test_accuracy: float = 0.0
    test_loss: float = 0.0
    train_loss: float = 0.0
    train_accuracy: float = 0.0
    steps: int = 0
    epochs: int = 0
    wall_s: float = 0.0
    train_s: float = 0.0  # wall time of the training phases alone (no evaluation)
    bytes_up: int = 0
    bytes_down: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)
    point: int = 0
    codec: str = ""
    staleness: int = 0
    network: str = "none"
    device_slowdown: float = 1.0
    model: str = ""
    dataset: str = ""
    runtime: str = "eager"
    error_feedback: bool = True
    defence: str = "none"  # what the device did to its cut features (`CutDefence.label`)
    privacy_floor: str | None = None  # the --privacy-floor the engine kept to
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch records
    timeline: list[dict[str, float]] = field(default_factory=list)  # (wall_s, loss, acc) samples
    partition_history: list[dict[str, Any]] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)  # the last context snapshot (estimated link, compute)
    step_times: list[float] = field(default_factory=list)  # seconds from connect to each applied step
    num_blocks: int = 0  # of the model: point == num_blocks is device-only
    stopped_early: bool = False  # ``max_train_s`` ran out before the last epoch
    #: connect to first step: handshake, link probes, the engine's start-up decision
    #: and any migration it made (the profiling before connecting is not in it)
    startup_s: float = 0.0
    #: profiling the device for the engine before connecting (not in ``wall_s``)
    prepare_s: float = 0.0
    #: why the run stopped before its end ("SIGINT", "SIGTERM"); None: it ran to the end
    interrupted: str | None = None
    #: one entry per dropped connection survived: step, reason, outage_s, resent
    reconnects: list[dict[str, Any]] = field(default_factory=list)
    #: roll backs to a checkpoint: from_step (None: the device restarted), to_step, reason
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    #: checkpoints agreed with the cloud: saved (count), step (the newest), bytes and
    #: write_s (the device's own files, with --checkpoint-dir), directory
    checkpoints: dict[str, Any] = field(default_factory=dict)
    #: applied steps per configuration ("p=2 int8 K=4": n); device-only is "p=L fp32 K=0"
    steps_by_choice: dict[str, int] = field(default_factory=dict)
    #: what the same steps would have cost on the device alone, from the calibrated
    #: cost model: {"step_ms", "train_s", "measured"} (None: no engine, not estimated)
    device_only_estimate: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass
class LocalSetup:
    """The device's local objects for a run."""

    spec: zoo.ModelSpec
    splits: datasets.DatasetSplits
    point: int
    manifest: dict[str, Any] | None = None  # exported programs' manifest (program runtimes)
    #: (point, codec) -> why --privacy-floor rules it out
    privacy_exclusions: dict[tuple[int, str], str] = field(default_factory=dict)

    @property
    def program_points(self) -> list[int] | None:
        if self.manifest is None:
            return None
        return sorted(int(p) for p in self.manifest.get("points", {}))

    def train_loader(self, cfg: TrainConfig, epoch: int) -> DataLoader:
        # One generator per epoch seeded from (seed, epoch): the batch order is a
        # pure function of the configuration, so split and centralized runs see
        # the same batches.
        g = torch.Generator()
        g.manual_seed(cfg.seed * 1000 + epoch)
        # Exported programs have a fixed batch size: a short last batch is dropped
        # (padding would skew train-mode BatchNorm statistics).
        return DataLoader(
            self.splits.train, batch_size=cfg.batch_size, shuffle=True, generator=g, drop_last=self.manifest is not None
        )

    def steps_per_epoch(self, cfg: TrainConfig) -> int:
        n = (
            len(self.splits.train) // cfg.batch_size
            if self.manifest is not None
            else math.ceil(len(self.splits.train) / cfg.batch_size)
        )
        return n if cfg.max_steps_per_epoch is None else min(n, cfg.max_steps_per_epoch)

    def total_steps(self, cfg: TrainConfig) -> int:
        return cfg.epochs * self.steps_per_epoch(cfg)

    def test_loader(self, cfg: TrainConfig) -> DataLoader:
        # programs run eval batches at their fixed size too (a short one is padded)
        size = cfg.batch_size if self.manifest is not None else cfg.eval_batch_size
        # its own generator: iterating a DataLoader draws a seed from the generator,
        # and from torch's global one without it, which would shift every later
        # dropout mask (an evaluation repeated after a reconnect must not change training)
        return DataLoader(self.splits.test, batch_size=size, shuffle=False, generator=torch.Generator().manual_seed(0))


def default_point(spec: zoo.ModelSpec) -> int:
    """A middle cut: the model's first interior cut point past a quarter of its blocks."""
    model = spec.model
    interior = model.interior_points
    if not interior:
        raise ValueError(f"model {spec.name} has no interior cut point")
    quarter = model.num_blocks / 4
    for p in interior:
        if p >= quarter:
            return p
    return interior[-1]


def device_only_possible(cfg: TrainConfig, manifest: dict[str, Any] | None, num_blocks: int) -> bool:
    """Whether the device can run every block and the loss: eager PyTorch always
    can; a program runtime only with a program exported at the block count."""
    if cfg.runtime == "eager":
        return True
    return manifest is not None and str(num_blocks) in {str(p) for p in manifest.get("points", {})}


def build_local(cfg: TrainConfig) -> LocalSetup:
    """Build the model and load the data, with one clear error for a mismatch."""
    cfg.validate()
    spec = zoo.build(cfg.model, seed=cfg.seed)
    splits = datasets.load(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed)
    if tuple(splits.input_shape) != tuple(spec.input_shape):
        raise ValueError(
            f"model {cfg.model} expects inputs of shape {tuple(spec.input_shape)}, "
            f"dataset {cfg.dataset} gives {tuple(splits.input_shape)}"
        )
    warm_up()
    manifest = _check_programs(cfg, spec) if cfg.runtime != "eager" else None
    L = spec.model.num_blocks
    valid = spec.model.interior_points
    if manifest is not None:
        exported = {int(p) for p in manifest.get("points", {})}
        valid = [p for p in valid if p in exported]
        if not valid:
            raise ValueError(f"the programs in {cfg.programs} cover no interior cut of {cfg.model}")
    if cfg.save_model and not device_only_possible(cfg, manifest, L):
        raise ValueError("--save-model brings the whole model to the device: it needs --runtime eager or a whole-model program")
    point = L if cfg.point == DEVICE_ONLY else cfg.point
    excluded = privacy_exclusions(cfg, spec)
    if point == L:
        if not device_only_possible(cfg, manifest, L):
            raise ValueError(
                f"--point {cfg.point}: training alone needs --runtime eager or an exported program of the whole model"
            )
        return LocalSetup(spec=spec, splits=splits, point=L, manifest=manifest, privacy_exclusions=excluded)
    if not (point is None or isinstance(point, int)):
        raise ValueError(f"--point must be 'auto', '{DEVICE_ONLY}' or a block index, got {point!r}")
    if point is None:
        point = default_point(spec)
        if point not in valid:
            point = min(valid, key=lambda p: abs(p - point))
    if point not in valid:
        raise ValueError(
            f"--point {point} is not a valid interior cut of {cfg.model}"
            f"{' with exported programs' if manifest else ''}; valid points: {valid}"
        )
    if excluded:
        point = _point_within_floor(cfg, point, valid, excluded, alone=device_only_possible(cfg, manifest, L), num_blocks=L)
    return LocalSetup(spec=spec, splits=splits, point=point, manifest=manifest, privacy_exclusions=excluded)


def privacy_exclusions(cfg: TrainConfig, spec: zoo.ModelSpec) -> dict[tuple[int, str], str]:
    """What ``--privacy-floor`` rules out for this model and ``--defence`` (empty without a floor)."""
    if cfg.privacy_floor is None:
        return {}
    from schemas.codecs import LABELS

    floor = PrivacyFloor.parse(cfg.privacy_floor)
    profile = PrivacyProfile.load(cfg.privacy_profile) if cfg.privacy_profile else None
    return exclusions(
        floor,
        profile,
        model=spec.name,
        defence=cfg.cut_defence.label,
        points=spec.model.interior_points,
        codec_labels=list(LABELS),
        num_blocks=spec.model.num_blocks,
    )


def _point_within_floor(
    cfg: TrainConfig, point: int, valid: list[int], excluded: dict[tuple[int, str], str], *, alone: bool, num_blocks: int
) -> int:
    """The starting cut under the privacy floor: ``point`` if a codec the run may
    use there is allowed, else the nearest deeper allowed cut, else training alone.
    A fixed ``--point`` (and ``--codec``) that breaks the floor is an error."""
    from edge_sdk.decision.cost_model import AUTO_CODECS
    from schemas.codecs import Codec

    usable = AUTO_CODECS if cfg.codec == "auto" else (Codec.parse(cfg.codec).label,)

    def allowed(p: int) -> bool:
        return any((p, c) not in excluded for c in usable)

    if allowed(point):
        return point
    if not cfg.auto_point:
        reasons = "; ".join(dict.fromkeys(excluded[(point, c)] for c in usable if (point, c) in excluded))
        raise ValueError(f"--point {point} breaks --privacy-floor {cfg.privacy_floor}: {reasons}")
    deeper = [p for p in valid if p > point and allowed(p)] or [p for p in valid if allowed(p)]
    if deeper:
        return deeper[0]
    if alone and cfg.allow_device_only:
        return num_blocks
    raise ValueError(
        f"--privacy-floor {cfg.privacy_floor} rules out every cut of {cfg.model} with --defence {cfg.defence} "
        f"and training alone is not possible here; lower the floor, add a defence, or allow device-only training"
    )


def _check_programs(cfg: TrainConfig, spec: zoo.ModelSpec) -> dict[str, Any]:
    """The manifest of ``cfg.programs``, checked against the model and batch size."""
    from edge_sdk.runtime import ManifestError, load_manifest

    try:
        manifest = load_manifest(cfg.programs)
    except (ManifestError, OSError, ValueError) as exc:
        raise ValueError(f"cannot use programs in {cfg.programs}: {exc}") from None
    if manifest.get("config_hash") != spec.config_hash:
        raise ValueError(
            f"the programs in {cfg.programs} were exported from another model config "
            f"({manifest.get('model')} {str(manifest.get('config_hash'))[:12]}, this run: {spec.name} {spec.config_hash[:12]})"
        )
    if int(manifest.get("batch_size", -1)) != cfg.batch_size:
        raise ValueError(
            f"the programs in {cfg.programs} have batch size {manifest.get('batch_size')}; "
            f"pass --batch-size {manifest.get('batch_size')} or export again"
        )
    if manifest.get("format") != cfg.runtime:
        raise ValueError(f"the programs in {cfg.programs} are {manifest.get('format')} programs, not {cfg.runtime}")
    return manifest
