"""``python -m edge_sdk privacy``: how much each cut's features reveal, measured.

Writes the privacy profile (``privacy.json``) that ``train``/``emulate`` read
with ``--privacy-profile`` and ``--privacy-floor``, and two pictures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated cut points, e.g. 1,2,3; got {text!r}") from None


def _defence(text: str):
    from edge_sdk.privacy.defences import CutDefence

    try:
        return CutDefence.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edge_sdk import data, zoo
    from schemas.codecs import LABELS

    parser.description = (
        "Train the model on a private split with each defence at each cut, then train an inversion decoder "
        "(features -> input) on a disjoint public split, as a curious cloud could, and score how well it rebuilds "
        "private inputs from the features that cross the wire (after the codec): MSE, PSNR, SSIM, against the "
        "chance score of answering the mean input. Writes privacy.json (the profile --privacy-floor reads), "
        "privacy.png and reconstructions.png."
    )
    parser.add_argument("--model", default=None, choices=zoo.names(), help="zoo model (default: the dataset's recipe model)")
    parser.add_argument("--dataset", default="digits", choices=data.names(), help="dataset (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="folder holding a real dataset's files")
    parser.add_argument(
        "--points", type=_int_list, default=None, metavar="P,P,...", help="cut points to measure (default: every interior cut)"
    )
    parser.add_argument(
        "--codec",
        action="append",
        choices=LABELS,
        default=None,
        help="feature codec the cloud sees; repeat for several (default: every codec the engine may pick, "
        "so a --privacy-floor run keeps them all)",
    )
    parser.add_argument(
        "--defence",
        action="append",
        type=_defence,
        default=None,
        metavar="D",
        help="defence at the cut: none, noise=S (Gaussian, S x the feature RMS), nopeek=A (distance-correlation "
        "penalty weight), or both joined by '+'; repeat to compare several (default: none)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model (default: the recipe's)")
    parser.add_argument("--attack-steps", type=int, default=1000, help="decoder training steps per attack (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="model, split and decoder seed (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/privacy"), help="report folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edge_sdk.decision.cost_model import AUTO_CODECS
    from edge_sdk.privacy import report as report_io
    from edge_sdk.privacy.defences import CutDefence
    from edge_sdk.privacy.measure import PrivacyConfig, measure
    from edge_sdk.zoo.recipes import RECIPES, recipe_for_dataset

    try:
        model = args.model or recipe_for_dataset(args.dataset)[0]
    except ValueError as exc:
        print(f"error: {exc}; give --model", file=sys.stderr)
        return 2
    if args.epochs is not None and args.epochs < 1:
        print(f"error: --epochs must be >= 1, got {args.epochs}", file=sys.stderr)
        return 2
    if args.attack_steps < 1:
        print(f"error: --attack-steps must be >= 1, got {args.attack_steps}", file=sys.stderr)
        return 2
    recipe = RECIPES.get(model)
    training = PrivacyConfig(model=model, dataset=args.dataset)  # the defaults, for a model without a recipe
    cfg = PrivacyConfig(
        model=model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        points=args.points,
        codecs=tuple(args.codec or AUTO_CODECS),
        defences=tuple(dict.fromkeys(args.defence or [CutDefence()])),
        epochs=args.epochs,
        seed=args.seed,
        attack_steps=args.attack_steps,
        batch_size=recipe.batch_size if recipe else training.batch_size,
        lr=recipe.lr if recipe else training.lr,
        optimizer=recipe.optimizer if recipe else training.optimizer,
    )
    bar: tqdm | None = None

    def progress(total: int):
        nonlocal bar
        bar = tqdm(total=total, unit="step", desc="train + attack", disable=args.no_progress, file=sys.stderr, mininterval=0.5)
        return bar.update

    try:
        report = measure(cfg, progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    paths = report_io.write(report, args.out)
    print(report_io.table(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
