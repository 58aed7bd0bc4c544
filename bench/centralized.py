"""Centralized (unsplit) accuracy sanity for the small zoo models.

Run: ``python bench/centralized.py [--models digits_cnn mnist1d_cnn] [--out bench/results/centralized.json]``

Trains each model with its recipe from ``edge_sdk.zoo.recipes.RECIPES`` on this
CPU and writes the exact final test accuracy, per-epoch accuracies, the recipe
and the wall time. Split training (the pipeline issue) is compared against these
figures with the same recipe.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_sdk import data, zoo
from edge_sdk.zoo.recipes import RECIPES, train_centralized

TARGETS = {"digits_cnn": 0.97, "mnist1d_cnn": 0.90}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(RECIPES), choices=sorted(RECIPES))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "centralized.json")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 is fastest for these tiny models and robust on a busy machine"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    ok = True
    for name in args.models:
        recipe = RECIPES[name]
        spec = zoo.build(name, seed=recipe.seed)
        splits = data.load(recipe.dataset, seed=recipe.seed)
        res = train_centralized(spec, splits, recipe)
        passed = res.final_test_accuracy >= TARGETS[name]
        ok &= passed
        results[name] = {
            "dataset": recipe.dataset,
            "train_samples": len(splits.train),
            "test_samples": len(splits.test),
            "recipe": recipe.to_dict(),
            "loss": "cross_entropy",
            "final_test_accuracy": res.final_test_accuracy,
            "final_test_loss": res.final_test_loss,
            "epoch_test_accuracy": res.epoch_test_accuracy,
            "epoch_train_loss": res.epoch_train_loss,
            "steps": res.steps,
            "train_seconds": round(res.seconds, 2),
            "target_accuracy": TARGETS[name],
            "passed": passed,
            "config_hash": spec.config_hash,
        }
        print(
            f"{name}: test accuracy {res.final_test_accuracy:.4f} after {recipe.epochs} epochs "
            f"({res.steps} steps, {res.seconds:.1f} s) target {TARGETS[name]} {'OK' if passed else 'FAIL'}"
        )
    doc = {
        "benchmark": "centralized",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "command": "python bench/centralized.py --threads " + str(args.threads),
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
