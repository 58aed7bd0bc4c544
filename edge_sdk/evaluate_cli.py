"""`python -m edge_sdk evaluate`: test accuracy of a model saved with ``--save-model``."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edge_sdk import data

    p.add_argument("--model-file", required=True, metavar="PATH", help="the .safetensors file a run saved (its .json beside it)")
    p.add_argument(
        "--dataset",
        choices=data.names(),
        default=None,
        help="dataset whose test split to use (default: the one it was trained on)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="folder holding a real dataset's files (default: none)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from edge_sdk import data, zoo
    from edge_sdk.model_file import load_model
    from edge_sdk.zoo.recipes import evaluate

    try:
        spec, meta = load_model(args.model_file)
        dataset = args.dataset or meta.get("dataset")
        if not dataset:
            raise ValueError("the model file does not say which dataset it was trained on; pass --dataset")
        splits = data.load(dataset, data_dir=args.data_dir, seed=int(meta.get("seed", 0)))
        if tuple(splits.input_shape) != tuple(spec.input_shape):
            raise ValueError(
                f"{spec.name} takes inputs of shape {tuple(spec.input_shape)}; {dataset} has {tuple(splits.input_shape)}"
            )
        accuracy, loss = evaluate(spec, splits.test, batch_size=args.batch_size)
    except (zoo.WeightsError, data.DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{spec.name} on {dataset} test ({len(splits.test)} samples): accuracy {100 * accuracy:.2f} %, loss {loss:.4f}")
    return 0
