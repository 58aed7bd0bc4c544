"""Benchmark the exported head programs against eager PyTorch on this CPU.

Writes ``bench/results/export.json``: per model, per exported point the program
size and export time; at the timed point the per-step time (forward + replayed
forward + backward, see ``edge_sdk.timing``) of the eager head, the
ExecuTorch program (with and, for small models, without the layer rewrites) and the
TorchScript program, with ratios measured in the same run.

    python -m bench.export                     # digits, mnist1d, mobilenetv3 (a few minutes)
    python -m bench.export --models digits_cnn --batch-size 32 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

from edge_sdk import zoo
from edge_sdk.runtime.eager import EagerRuntime
from edge_sdk.runtime.loading import load_runtime
from edge_sdk.timing import profile_runtime, profile_runtimes
from export.api import export_head, exporter_versions, write_manifest

# model -> (points to export, point to time)
DEFAULT = {
    "digits_cnn": ([1, 2, 3, 4], 4),
    "mnist1d_cnn": ([1, 3, 5], 5),
    "mobilenetv3_large": ([3], 3),
}
UNOPTIMIZED = {"digits_cnn", "mnist1d_cnn"}  # the portable-kernel baseline is minutes per step for larger heads


class _EagerNoStatsRestore(EagerRuntime):
    """Eager replay timing: forward + backward (the buffer save/restore costs ~nothing)."""

    def replay_backward(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        self.module.train(True)
        for p in self.module.parameters():
            p.grad = None
        self.module(x).backward(grad)


def _export(spec, points, fmt, batch, out, optimize=True) -> list[dict]:
    entries = [
        export_head(
            spec.model.head(p),
            spec.input_shape,
            point=p,
            batch_size=batch,
            out_dir=out,
            fmt=fmt,
            name_map=spec.model.head_name_map(p),
            optimize=optimize,
        )
        for p in points
    ]
    write_manifest(out, entries, model=spec.name, config_hash=spec.config_hash, fmt=fmt, batch_size=batch)
    return entries


def bench_model(name: str, points: list[int], timed: int, batch: int, repeats: int, root: Path) -> dict:
    spec = zoo.build(name)
    weights = spec.model.state_dict()
    result: dict = {"points": {}, "timed_point": timed, "batch_size": batch}
    print(f"{name}: exporting points {points}", flush=True)
    et = _export(spec, points, "executorch", batch, root / f"{name}-et")
    ts = _export(spec, [timed], "torchscript", batch, root / f"{name}-ts")
    for e in et:
        result["points"][str(e["point"])] = {
            "executorch_bytes": e["size_bytes"],
            "executorch_export_s": e["export_seconds"],
            "features_shape": e["features"]["shape"],
        }
    result["points"][str(timed)].update(
        {"torchscript_bytes": ts[0]["size_bytes"], "torchscript_export_s": ts[0]["export_seconds"]}
    )
    x = torch.randn(batch, *spec.input_shape)
    g = torch.randn(
        et[-1]["features"]["shape"]
        if et[-1]["point"] == timed
        else next(e for e in et if e["point"] == timed)["features"]["shape"]
    )
    runtimes = {
        "eager": _EagerNoStatsRestore(spec.model.head(timed)),
        "executorch": load_runtime("executorch", root / f"{name}-et", timed, weights),
        "torchscript": load_runtime("torchscript", root / f"{name}-ts", timed, weights),
    }
    # the three runtimes step round-robin, so a burst of load on this shared machine
    # hits all of them alike; the (minutes-slow) unoptimized program is timed apart
    timing = profile_runtimes(runtimes, x, g, repeats)
    if name in UNOPTIMIZED:
        _export(spec, [timed], "executorch", batch, root / f"{name}-et-noopt", optimize=False)
        noopt = load_runtime("executorch", root / f"{name}-et-noopt", timed, weights)
        timing["executorch_unoptimized"] = profile_runtime(noopt, x, g, max(1, repeats // 2))
    for kind, t in timing.items():
        print(f"  {kind:24s} forward {t['forward_ms']:8.2f} ms  step {t['step_ms']:8.2f} ms", flush=True)
    eager = timing["eager"]["step_ms"]
    result["timing_ms"] = timing
    result["step_ratio_vs_eager"] = {k: round(v["step_ms"] / eager, 2) for k, v in timing.items() if k != "eager"}
    print(f"  step ratio vs eager: {result['step_ratio_vs_eager']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT), help="comma-separated subset of " + ", ".join(DEFAULT))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9, help="timed steps per runtime, taken round-robin (median)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for eager/TorchScript (default 1, like the ExecuTorch portable kernels)",
    )
    p.add_argument("--out", default="bench/results/export.json")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": args.threads},
        "versions": exporter_versions(),
        "step": "forward (features) + replayed forward + backward, median wall time",
        "models": {},
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            points, timed = DEFAULT[m]
            report["models"][m] = bench_model(m, points, timed, args.batch_size, args.repeats, Path(tmp))
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
