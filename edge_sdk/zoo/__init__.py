"""The model zoo: ``build(name, seed=0, **kw) -> ModelSpec``.

Why a seed-determined build: the cloud never receives the model. The device and
the cloud each call ``build(name, seed, **kw)`` and get bit-identical initial
weights; the device keeps the head, the cloud the tail, and ``config_hash`` lets
them check that they built the same thing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_sdk.blocks import BlockModel
from edge_sdk.zoo import generator, recsys, resnet, small, text, vision
from edge_sdk.zoo.targets import TargetSpec

__all__ = ["ModelSpec", "TargetSpec", "WeightsError", "build", "classification_loss", "load_weights", "names", "save_weights"]

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]


def classification_loss(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross entropy, and the number of argmax predictions equal to the target."""
    loss = nn.functional.cross_entropy(output, target)
    correct = int((output.detach().argmax(dim=1) == target).sum().item())
    return loss, correct


@dataclass
class ModelSpec:
    """A built zoo model plus what the rest of the system needs to train it."""

    name: str
    model: BlockModel
    input_shape: tuple[int, ...]  # per sample, no batch dimension
    input_dtype: torch.dtype  # float32, or int64 for token / id inputs
    num_classes: int  # classes, or the output dimension (din: 1, chair_generator: 4 channels)
    output_shape: tuple[int, ...]  # per sample
    loss: LossFn
    config_hash: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    target: TargetSpec = field(default_factory=lambda: TargetSpec("class"))  # what a valid training target of ``loss`` looks like

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """A valid input batch (ids in range for int64 inputs), for tracing and tests."""
        shape = (batch_size, *self.input_shape)
        if self.input_dtype == torch.int64:
            return torch.ones(shape, dtype=torch.int64)
        return torch.zeros(shape, dtype=self.input_dtype)


# name -> builder(**kw) -> (model, input_shape, input_dtype, num_classes, output_shape, loss)
_Built = tuple[BlockModel, tuple[int, ...], torch.dtype, int, tuple[int, ...], LossFn]


def _resnet50(num_classes: int = 10, image_size: int = 32) -> _Built:
    x = torch.zeros(1, 3, image_size, image_size)
    return (
        BlockModel.from_module(resnet.resnet50(num_classes, "cifar"), x),
        (3, image_size, image_size),
        torch.float32,
        num_classes,
        (num_classes,),
        classification_loss,
    )


def _resnet50_imagenet(num_classes: int = 200, image_size: int = 64) -> _Built:
    x = torch.zeros(1, 3, image_size, image_size)
    return (
        BlockModel.from_module(resnet.resnet50(num_classes, "imagenet"), x),
        (3, image_size, image_size),
        torch.float32,
        num_classes,
        (num_classes,),
        classification_loss,
    )


def _vgg19(num_classes: int = 10) -> _Built:
    return vision.vgg19(num_classes), (3, 32, 32), torch.float32, num_classes, (num_classes,), classification_loss


def _mobilenetv3_large(num_classes: int = 10) -> _Built:
    return (vision.mobilenetv3_large(num_classes), (3, 32, 32), torch.float32, num_classes, (num_classes,), classification_loss)


def _bilstm(vocab_size: int = 20000, seq_len: int = 256, num_classes: int = 2, hidden: int = 128, embed_dim: int = 128) -> _Built:
    model = text.bilstm(vocab_size=vocab_size, embed_dim=embed_dim, hidden=hidden, num_classes=num_classes)
    return model, (seq_len,), torch.int64, num_classes, (num_classes,), classification_loss


def _chair_generator(class_dim: int = 809, view_dim: int = 4, transform_dim: int = 12, width: int = 256) -> _Built:
    model = generator.chair_generator(class_dim, view_dim, transform_dim, width)
    return (model, (class_dim + view_dim + transform_dim,), torch.float32, 4, (4, 128, 128), generator.generator_loss)


def _din(history: int = 20, dim: int = 16, num_users: int = 6041, num_items: int = 3953, num_genres: int = 19) -> _Built:
    model = recsys.din(num_users=num_users, num_items=num_items, num_genres=num_genres, dim=dim, history=history)
    return model, (3 + 2 * history,), torch.int64, 1, (1,), recsys.din_loss


def _digits_cnn(num_classes: int = 10, width: int = 16, dropout: float = 0.25) -> _Built:
    return (
        small.digits_cnn(num_classes, width, dropout),
        (1, 8, 8),
        torch.float32,
        num_classes,
        (num_classes,),
        classification_loss,
    )


def _mnist1d_cnn(num_classes: int = 10, width: int = 32) -> _Built:
    return small.mnist1d_cnn(num_classes, width), (1, 40), torch.float32, num_classes, (num_classes,), classification_loss


_REGISTRY: dict[str, Callable[..., _Built]] = {
    "resnet50": _resnet50,
    "vgg19": _vgg19,
    "mobilenetv3_large": _mobilenetv3_large,
    "resnet50_imagenet": _resnet50_imagenet,
    "bilstm": _bilstm,
    "chair_generator": _chair_generator,
    "din": _din,
    "digits_cnn": _digits_cnn,
    "mnist1d_cnn": _mnist1d_cnn,
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(i) for i in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(i) for k, i in sorted(v.items())}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


def architecture_summary(model: BlockModel) -> dict[str, Any]:
    """Machine-independent description: per block, its name, module classes, and
    state-dict entries with shapes and dtypes."""
    blocks = []
    for name, block in zip(model.block_names, model.blocks):
        blocks.append(
            {
                "name": name,
                "modules": [type(m).__name__ for m in block.modules()],
                "state": [[k, list(v.shape), str(v.dtype)] for k, v in block.state_dict().items()],
            }
        )
    return {"num_blocks": model.num_blocks, "cut_points": model.cut_points, "blocks": blocks}


def config_hash(
    name: str, kwargs: dict[str, Any], model: BlockModel, input_shape: tuple[int, ...], input_dtype: torch.dtype
) -> str:
    doc = {
        "name": name,
        "kwargs": _jsonable(kwargs),
        "input_shape": list(input_shape),
        "input_dtype": str(input_dtype),
        "architecture": architecture_summary(model),
    }
    canon = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


def build(name: str, seed: int = 0, **kw: Any) -> ModelSpec:
    """Build zoo model ``name`` with weights initialized from ``seed``.

    Same ``(name, seed, kw)`` -> bit-identical weights on any machine (CPU RNG,
    seeded in a forked RNG scope so the caller's global RNG state is untouched).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model, input_shape, dtype, num_classes, out_shape, loss = _REGISTRY[name](**kw)
        except TypeError as exc:
            raise ValueError(f"bad arguments for model {name!r}: {exc}") from exc
    h = config_hash(name, kw, model, input_shape, dtype)
    return ModelSpec(
        name=name,
        model=model,
        input_shape=tuple(input_shape),
        input_dtype=dtype,
        num_classes=num_classes,
        output_shape=tuple(out_shape),
        loss=loss,
        config_hash=h,
        kwargs=dict(kw),
        seed=seed,
        target=_target(loss, num_classes, tuple(out_shape)),
    )


def _target(loss: LossFn, num_classes: int, output_shape: tuple[int, ...]) -> TargetSpec:
    if loss is classification_loss:
        return TargetSpec("class", num_classes=num_classes)
    if loss is recsys.din_loss:
        return TargetSpec("binary")
    if loss is generator.generator_loss:
        return TargetSpec("dense", shape=output_shape)
    raise ValueError(f"no target description for loss {loss!r}; add one to zoo._target")


# ------------------------------------------------------------------ weights
class WeightsError(ValueError):
    """A weight file does not match the model (keys or shapes), or cannot be read."""


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path} is not a state dict readable with weights_only=True: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a flat state dict of tensors")
    return obj


def load_weights(spec: ModelSpec, path: str | Path) -> None:
    """Load pretrained weights into ``spec.model`` in place (tensor identity kept,
    so heads/tails already handed out see the new values).

    Accepts ``.safetensors`` or a torch file of a state dict (read with
    ``weights_only=True``: no pickle code runs). Keys must be the model's
    ``blocks.<i>.<...>`` names; any missing / unexpected key or shape mismatch
    raises :class:`WeightsError` listing them."""
    path = Path(path)
    state = _read_state(path)
    own = spec.model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:

        def head(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {head(shapes)}")
        raise WeightsError(f"weights in {path} do not match model {spec.name!r}: " + "; ".join(parts))
    spec.model.load_state_dict(state, strict=True)


def save_weights(spec: ModelSpec, path: str | Path) -> None:
    """Write ``spec.model``'s state dict as safetensors (no pickle)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in spec.model.state_dict().items()}
    save_file(state, str(path))
