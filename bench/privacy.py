"""What each cut reveals, and what the defences buy and cost (issue 18 §4).

For digits (digits_cnn) and MNIST-1D (mnist1d_cnn), at every interior cut, with
the int8 codec the engine starts with: the feature-inversion attack of
``python -m edge_sdk privacy`` (MLP decoder trained on a public split, scored on
private samples) without a defence and with each of ``--defences``; per
(cut, defence):

* attack PSNR / SSIM / MSE, against chance (answering the mean public input);
* test accuracy of the model trained with that defence at that cut;
* the speed cost: the defence's device compute per step next to the head's
  forward + backward at that cut (the same batch, measured in the same process).

    python bench/privacy.py                        # both datasets, ~15 min on 2 cores
    python bench/privacy.py --datasets digits --epochs 5 --attack-steps 300   # a quick look

Writes bench/results/privacy.json and, per dataset, privacy_<dataset>.png (attack
PSNR per cut, and accuracy against attack PSNR) and reconstructions_<dataset>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
MODELS = {"digits": "digits_cnn", "mnist1d": "mnist1d_cnn"}
DEFAULT_DEFENCES = "noise=0.5,noise=1,nopeek=1,nopeek=4"


def summarize(doc: dict) -> list[dict]:
    """Per (cut, defence): attack PSNR and accuracy against the undefended run at that cut."""
    plain = {r["point"]: r for r in doc["results"] if r["defence"] == "none"}
    rows = []
    for r in doc["results"]:
        base = plain.get(r["point"])
        rows.append(
            {
                "point": r["point"],
                "defence": r["defence"],
                "psnr_db": round(r["psnr_db"], 2),
                "ssim": round(r["ssim"], 3),
                "test_accuracy": round(r["test_accuracy"], 4),
                "psnr_drop_db": round(base["psnr_db"] - r["psnr_db"], 2) if base else None,
                "accuracy_cost": round(base["test_accuracy"] - r["test_accuracy"], 4) if base else None,
                "step_time_ratio": round((r["head_ms_per_step"] + r["defence_ms_per_step"]) / r["head_ms_per_step"], 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from edge_sdk.privacy import report as report_io
    from edge_sdk.privacy.defences import CutDefence
    from edge_sdk.privacy.measure import PrivacyConfig, measure
    from edge_sdk.zoo.recipes import RECIPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="digits,mnist1d", help="comma-separated, of: digits, mnist1d (default: %(default)s)")
    ap.add_argument("--defences", default=DEFAULT_DEFENCES, help="comma-separated defences besides none (default: %(default)s)")
    ap.add_argument("--codec", default="int8", help="codec the attacker sees (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs per model (default: the recipe's)")
    ap.add_argument("--attack-steps", type=int, default=1000, help="decoder steps per attack (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    args = ap.parse_args(argv)

    defences = (CutDefence(), *(CutDefence.parse(d) for d in args.defences.split(",") if d.strip()))
    doc: dict = {"codec": args.codec, "defences": [d.label for d in defences], "datasets": {}}
    for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        model = MODELS[dataset]
        recipe = RECIPES[model]
        cfg = PrivacyConfig(
            model=model,
            dataset=dataset,
            codecs=(args.codec,),
            defences=defences,
            epochs=args.epochs,
            attack_steps=args.attack_steps,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            optimizer=recipe.optimizer,
        )
        bar: tqdm | None = None

        def progress(total: int, label: str = dataset):
            nonlocal bar
            bar = tqdm(total=total, unit="step", desc=label, file=sys.stderr, mininterval=1.0)
            return bar.update

        t0 = time.perf_counter()
        report = measure(cfg, progress)
        if bar is not None:
            bar.close()
        report_io.plot_psnr(report, args.out.parent / f"privacy_{dataset}.png")
        report_io.plot_reconstructions(report, args.out.parent / f"reconstructions_{dataset}.png")
        entry = report.to_dict()
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        entry["summary"] = summarize(entry)
        doc["datasets"][dataset] = entry
        print(f"\n{dataset} ({model}), codec {args.codec}:")
        print(report_io.table(report))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
