"""Export one head to a program file plus its manifest entry (library API of the CLI)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_sdk.runtime.program import MANIFEST, sha256_file
from export.program import PreparedHead, prepare_head

FORMATS = ("executorch", "torchscript")
SUFFIX = {"executorch": ".pte", "torchscript": ".pt"}


def exporter_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    try:
        from importlib.metadata import version

        versions["executorch"] = version("executorch")
        versions["splitreplay"] = version("splitreplay")
    except Exception:  # noqa: BLE001 # pragma: no cover - metadata missing in odd installs
        pass
    return versions


def map_name(local: str, name_map: Mapping[str, str] | None) -> str:
    """Local head name -> full model name, also for module/buffer names the map lacks.

    ``head_name_map`` lists parameters; a buffer or module name is mapped through a
    parameter below it (``1`` via ``1.weight -> blocks.1.weight`` gives ``blocks.1``).
    """
    if not name_map:
        return local
    if local in name_map:
        return name_map[local]
    head, _, leaf = local.rpartition(".")
    for candidate in (local, head):
        if not candidate:
            continue
        for k, v in name_map.items():
            if k.startswith(candidate + ".") and v.endswith(k[len(candidate) :]):
                base = v[: len(v) - len(k) + len(candidate)]
                return base if candidate == local else f"{base}.{leaf}"
    return local


def manifest_entry(prep: PreparedHead, point: int, name_map: Mapping[str, str] | None) -> dict[str, Any]:
    """The per-point manifest entry (everything but file, hash and timings)."""
    m = lambda n: map_name(n, name_map)
    params = [{"name": m(p.name), "local": p.name, "shape": p.shape, "dtype": p.dtype} for p in prep.params]
    buffers = [{"name": m(b.name), "shape": b.shape, "dtype": b.dtype} for b in prep.buffers]
    dropouts = [{**d, "name": m(d["name"])} for d in prep.dropouts]
    batchnorms = [{**b, "name": m(b["name"])} for b in prep.batchnorms]
    pnames = [p["name"] for p in params]
    bnames = [b["name"] for b in buffers]
    masks = [f"mask:{d['name']}" for d in dropouts]
    new_b = [] if prep.freeze_batchnorm else [f"new:{b}" for b in bnames]
    return {
        "point": point,
        "batch_size": prep.batch_size,
        "input": prep.input_spec.to_json(),
        "features": prep.feature_spec.to_json(),
        "parameters": params,
        "buffers": buffers,
        "batchnorms": batchnorms,
        "dropouts": dropouts,
        "freeze_batchnorm": prep.freeze_batchnorm,
        "methods": {
            "forward": {"inputs": ["x", *pnames, *bnames, *masks], "outputs": ["features", *new_b]},
            "forward_eval": {"inputs": ["x", *pnames, *bnames], "outputs": ["features"]},
            "forward_backward": {
                "inputs": ["x", "g", *bnames, *masks],
                "outputs": ["loss", *[f"grad:{p}" for p in pnames], *pnames],
                "loss": "sum(head(x) * g)",
            },
        },
    }


def export_head(
    head: nn.Module,
    input_shape: tuple[int, ...],
    *,
    point: int,
    batch_size: int,
    out_dir: str | Path,
    fmt: str = "executorch",
    name_map: Mapping[str, str] | None = None,
    freeze_batchnorm: bool = False,
    optimize: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export ``head`` (blocks ``[0, point)``) to ``out_dir``; returns its manifest entry."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    is_et = fmt == "executorch"
    prep = prepare_head(
        head, tuple(input_shape), batch_size, freeze_batchnorm=freeze_batchnorm, executorch=is_et, optimize=optimize
    )
    path = out_dir / f"head_p{point}{SUFFIX[fmt]}"
    rewrites: list[str] = []
    if is_et:
        from export.executorch_export import export_executorch

        # names of the graph rewrites applied before lowering (see export/layout.py)
        rewrites = ["maxpool_running_maximum", "conv1d_as_2d"]
        if optimize:
            rewrites += [
                "channel_major_layout",
                "conv_im2col_mm",
                "depthwise_conv_bmm",
                "batchnorm_analytic_backward",
                "relu_hardswish_sign_mask_backward",
                "linear_mm",
                "strided_taps_by_phase",
                "phase_interleave_pixel_shuffle",
                "mm_transposed_to_linear",
                "drop_alias_copies",
            ]
        export_executorch(prep, path, optimize=optimize)
    else:
        from export.torchscript_export import export_torchscript

        export_torchscript(prep, path)
    entry = manifest_entry(prep, point, name_map)
    entry.update(
        {
            "file": path.name,
            "sha256": sha256_file(path),
            "size_bytes": path.stat().st_size,
            "export_seconds": round(time.perf_counter() - t0, 3),
            "rewrites": rewrites,
        }
    )
    if log:
        log(f"  point {point}: {path.name} {entry['size_bytes'] / 1024:.1f} KiB in {entry['export_seconds']:.1f} s")
    return entry


def write_manifest(
    out_dir: str | Path,
    entries: list[dict[str, Any]],
    *,
    model: str,
    config_hash: str,
    fmt: str,
    batch_size: int,
) -> Path:
    """Write (or extend: points already there and not re-exported are kept) ``manifest.json``."""
    path = Path(out_dir) / MANIFEST
    manifest: dict[str, Any] = {}
    if path.exists():
        old = json.loads(path.read_text())
        if (old.get("model"), old.get("config_hash"), old.get("format"), old.get("batch_size")) == (
            model,
            config_hash,
            fmt,
            batch_size,
        ):
            manifest = old
    manifest.update(
        {
            "model": model,
            "config_hash": config_hash,
            "format": fmt,
            "batch_size": batch_size,
            "exporter": exporter_versions(),
        }
    )
    points = manifest.setdefault("points", {})
    for e in entries:
        points[str(e["point"])] = e
    manifest["points"] = dict(sorted(points.items(), key=lambda kv: int(kv[0])))
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
