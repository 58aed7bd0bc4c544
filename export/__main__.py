"""``python -m export``: ahead-of-time programs of a zoo model's edge heads.

Writes one program per partition point (``head_p<P>.pte`` or ``head_p<P>.pt``) and a
``manifest.json`` describing them (model id, config hash, shapes, parameter order,
sha256, exporter versions). The device loads them with
``edge_sdk.runtime.loading.load_runtime``.
"""

from __future__ import annotations

import argparse
import sys
import time

from export.api import FORMATS, export_head, write_manifest


def parse_points(text: str, interior: list[int], num_blocks: int) -> list[int]:
    """``all`` (every interior cut of the model) or ``1,3,5`` (``num_blocks``: the whole model)."""
    if text.strip() == "all":
        return list(interior)
    try:
        points = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise SystemExit(f"--points: expected 'all' or a comma-separated list of ints, got {text!r}") from None
    bad = [p for p in points if p not in interior and p != num_blocks]
    if bad:
        raise SystemExit(f"--points: {bad} not exportable; valid points: {interior} (and {num_blocks} = whole model)")
    return points


def build_parser() -> argparse.ArgumentParser:
    from edge_sdk import zoo

    p = argparse.ArgumentParser(
        prog="python -m export",
        description=(
            "Export a zoo model's edge head (blocks [0, p)) for each partition point p as an "
            "ahead-of-time program with methods forward, forward_eval and forward_backward "
            "(the backward of sum(head(x) * g) for an upstream gradient g), plus manifest.json."
        ),
        epilog="Example: python -m export --model digits_cnn --points 1,3 --format executorch --batch-size 32 --out programs/digits",
    )
    p.add_argument("--model", required=True, choices=zoo.names(), help="zoo model name")
    p.add_argument("--points", default="all", help="'all' or a comma-separated list of partition points (default: all)")
    p.add_argument("--format", default="executorch", choices=FORMATS, help="program format (default: executorch)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="fixed batch size of the program (default: 32); "
        "shorter batches are padded, or must be dropped for train-mode BatchNorm heads",
    )
    p.add_argument("--out", required=True, help="output directory (created; manifest.json is extended per point)")
    p.add_argument("--seed", type=int, default=0, help="zoo build seed (weights are only examples; default 0)")
    p.add_argument(
        "--freeze-batchnorm",
        action="store_true",
        help="BatchNorm uses its running statistics in every method and never updates them "
        "(default: batch statistics in training, running statistics updated on the device)",
    )
    p.add_argument(
        "--no-optimize", action="store_true", help="ExecuTorch: skip the graph rewrites that route work to optimized kernels"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from edge_sdk.quiet import quiet_third_party

    quiet_third_party()
    args = build_parser().parse_args(argv)
    from edge_sdk import zoo
    from export.executorch_export import UnsupportedOperatorError

    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    spec = zoo.build(args.model, seed=args.seed)
    model = spec.model
    points = parse_points(args.points, model.interior_points, model.num_blocks)
    print(
        f"exporting {args.model} ({spec.config_hash[:12]}) heads at points {points} as {args.format}, "
        f"batch {args.batch_size} -> {args.out}",
        flush=True,
    )
    entries = []
    t0 = time.perf_counter()
    for i, point in enumerate(points, 1):
        print(f"[{i}/{len(points)}] point {point} ...", flush=True)
        try:
            entry = export_head(
                model.head(point),
                spec.input_shape,
                point=point,
                batch_size=args.batch_size,
                out_dir=args.out,
                fmt=args.format,
                name_map=model.head_name_map(point),
                freeze_batchnorm=args.freeze_batchnorm,
                optimize=not args.no_optimize,
                log=lambda s: print(s, flush=True),
            )
        except (UnsupportedOperatorError, NotImplementedError) as exc:
            print(f"error: {args.model} point {point}: {exc}", file=sys.stderr)
            if entries:
                write_manifest(
                    args.out, entries, model=args.model, config_hash=spec.config_hash, fmt=args.format, batch_size=args.batch_size
                )
            return 1
        entries.append(entry)
    path = write_manifest(
        args.out, entries, model=args.model, config_hash=spec.config_hash, fmt=args.format, batch_size=args.batch_size
    )
    print(f"wrote {len(entries)} program(s) and {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
