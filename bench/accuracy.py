"""Accuracy parity of pipelined split training (issue 4 §6).

Per dataset and seed, with the centralized recipe of `edge_sdk.zoo.recipes`
(same epochs, batch size, optimizer, batch order):

* centralized training of the full model,
* split training over a real cloud backend on loopback, K = 4, int8 features
  with error feedback,
* the same with error feedback off (ablation).

Goal: split K=4 int8+EF within 1.0 percentage point of centralized (mean of 3 seeds).

    python bench/accuracy.py [--datasets digits,mnist1d] [--seeds 0,1,2]

Writes bench/results/accuracy.json and bench/results/accuracy.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_sdk import zoo
from edge_sdk.emulation.cli import cloud_process, run_through_proxy
from edge_sdk.local import train_locally
from edge_sdk.training import TrainConfig, build_local, default_point
from edge_sdk.zoo.recipes import recipe_for_dataset

RESULTS = ROOT / "bench" / "results"


def config_for(dataset: str, seed: int, **overrides) -> TrainConfig:
    model, r = recipe_for_dataset(dataset)
    # a fixed cut (the model's default): this bench measures accuracy, not the engine
    base = dict(
        model=model,
        dataset=dataset,
        point=default_point(zoo.build(model)),
        epochs=r.epochs,
        batch_size=r.batch_size,
        optimizer=r.optimizer,
        lr=r.lr,
        momentum=r.momentum,
        weight_decay=r.weight_decay,
        schedule="constant",
        seed=seed,
    )
    base.update(overrides)
    return TrainConfig(**base)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="digits,mnist1d")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--staleness", type=int, default=4)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (quick looks)")
    ap.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = {"epochs": args.epochs} if args.epochs else {}
    report: dict[str, dict] = {}
    with cloud_process(["--threads", "1"]) as (_proc, port):
        for dataset in args.datasets.split(","):
            runs: dict[str, list[float]] = {"centralized": [], "split_ef": [], "split_no_ef": []}
            for seed in seeds:
                central = train_locally(config_for(dataset, seed, **extra))
                runs["centralized"].append(central.test_accuracy)
                for key, ef in (("split_ef", True), ("split_no_ef", False)):
                    cfg = config_for(dataset, seed, staleness=args.staleness, codec=args.codec, error_feedback=ef, **extra)
                    res = asyncio.run(run_through_proxy(cfg, "none", port, None, build_local(cfg)))
                    runs[key].append(res.test_accuracy)
                print(
                    f"{dataset} seed {seed}: centralized {central.test_accuracy:.4f}  split+EF {runs['split_ef'][-1]:.4f}  "
                    f"split no-EF {runs['split_no_ef'][-1]:.4f}",
                    flush=True,
                )
            means = {k: statistics.mean(v) for k, v in runs.items()}
            report[dataset] = dict(
                runs=runs,
                mean=means,
                gap_pp_ef=100 * (means["centralized"] - means["split_ef"]),
                gap_pp_no_ef=100 * (means["centralized"] - means["split_no_ef"]),
                goal_within_1pp=abs(means["centralized"] - means["split_ef"]) <= 0.01
                or means["split_ef"] >= means["centralized"],
                config=config_for(dataset, seeds[0], staleness=args.staleness, codec=args.codec, **extra).__dict__,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"| dataset | centralized | split K={args.staleness} {args.codec} + EF | gap (pp) | without EF | gap (pp) | goal |")
    print("|---|---|---|---|---|---|---|")
    for d, r in report.items():
        m = r["mean"]
        print(
            f"| {d} | {100 * m['centralized']:.2f} | {100 * m['split_ef']:.2f} | {r['gap_pp_ef']:+.2f} | "
            f"{100 * m['split_no_ef']:.2f} | {r['gap_pp_no_ef']:+.2f} | {'ok' if r['goal_within_1pp'] else 'MISS'} |"
        )
    _plot(report, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [("centralized", "centralized"), ("split_ef", "split K=4 int8 + EF"), ("split_no_ef", "split K=4 int8, no EF")]
    names = list(report)
    for i, (k, label) in enumerate(keys):
        ax.bar([x + (i - 1) * 0.25 for x in range(len(names))], [100 * report[n]["mean"][k] for n in names], 0.25, label=label)
    ax.set_xticks(range(len(names)), names)
    lo = min(100 * min(r["mean"].values()) for r in report.values())
    ax.set_ylim(max(0, lo - 3), 100)
    ax.set_ylabel("test accuracy (%), mean of seeds")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
