"""The trained model as one file: safetensors weights plus a small JSON of its zoo
config, loadable anywhere the zoo is (``python -m edge_sdk evaluate``).

Why a sidecar and not a pickle: the weights file must be safe to open (safetensors
runs no code), and the zoo rebuilds the architecture from its name, kwargs and
seed; the config hash in the sidecar proves the rebuilt model is the one trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_sdk import zoo


def sidecar(path: str | Path) -> Path:
    """``model.safetensors`` -> ``model.json``."""
    return Path(path).with_suffix(".json")


def save_model(spec: zoo.ModelSpec, path: str | Path, **about: Any) -> list[Path]:
    """Write ``spec.model``'s weights (``path``, safetensors) and its zoo config
    (``sidecar(path)``), with ``about`` (dataset, test accuracy, ...) added."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--save-model {path}: the file name must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    zoo.save_weights(spec, path)
    meta = {"model": spec.name, "kwargs": spec.kwargs, "seed": spec.seed, "config_hash": spec.config_hash, **about}
    sidecar(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return [path, sidecar(path)]


def load_model(path: str | Path) -> tuple[zoo.ModelSpec, dict[str, Any]]:
    """The model saved at ``path`` and its sidecar; `zoo.WeightsError` with the
    reason when the files are missing or do not match."""
    path = Path(path)
    side = sidecar(path)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise zoo.WeightsError(f"{side} (the model's config, written next to its weights) does not exist") from None
    except json.JSONDecodeError as exc:
        raise zoo.WeightsError(f"{side} is not valid JSON: {exc}") from None
    try:
        spec = zoo.build(meta["model"], seed=int(meta.get("seed", 0)), **dict(meta.get("kwargs", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise zoo.WeightsError(f"{side} does not describe a zoo model: {exc}") from None
    if meta.get("config_hash") and meta["config_hash"] != spec.config_hash:
        raise zoo.WeightsError(f"{path} was trained with another version of {spec.name} (config hash differs)")
    zoo.load_weights(spec, path)
    return spec, meta
