"""`python -m edge_sdk train`: train against a running cloud backend.

The training flags are defined once here and reused by ``emulate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_sdk.training import TrainConfig, TrainResult


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--model", default="digits_cnn", help="zoo model (default: %(default)s)")
    g.add_argument(
        "--dataset",
        default="digits",
        help="dataset: digits, mnist1d (bundled) or cifar10, tinyimagenet, imdb, movielens (need --data-dir) (default: %(default)s)",
    )
    g.add_argument("--data-dir", help="folder holding a real dataset's files")
    g.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    g.add_argument(
        "--point",
        type=_point,
        default="auto",
        help="partition point p: blocks [0,p) run on the device; 'device' (or the block count) trains the whole "
        "model on the device alone; 'auto' lets the decision engine choose and move it, device-only included "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--no-device-only",
        dest="allow_device_only",
        action="store_false",
        help="with --point auto: never let the engine train on the device alone",
    )
    g.add_argument(
        "--codec", default="auto", help="feature codec: auto, fp32, fp16, bf16, int8, int8c, int4, topk (default: %(default)s)"
    )
    g.add_argument("--grad-codec", default="fp16", help="gradient codec for the way down (default: %(default)s)")
    g.add_argument(
        "--staleness",
        type=_auto_int,
        default="auto",
        help="K: steps allowed in flight beyond the current one; 0 = sequential; 'auto' sizes it to fill the pipe (default: %(default)s)",
    )
    g.add_argument(
        "--no-error-feedback", dest="error_feedback", action="store_false", help="turn off the g - E*g*g correction (ablation)"
    )
    g.add_argument(
        "--no-staleness-guard",
        dest="staleness_guard",
        action="store_false",
        help="do not cap stale head-gradient norms (ablation)",
    )
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"], help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="(default: %(default)s)")
    g.add_argument(
        "--schedule",
        default="cosine",
        choices=["constant", "cosine", "step"],
        help="per-epoch lr schedule, identical on both sides (default: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=0, help="model init, batch order and dropout seed (default: %(default)s)")
    g.add_argument("--token", default="", help="shared secret if the server was started with --token")
    g.add_argument("--tls-ca", help="CA certificate (PEM) to trust for a wss:// server, e.g. its self-signed certificate")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut each epoch short (smoke runs)")
    g.add_argument(
        "--device-slowdown",
        type=float,
        default=1.0,
        help="emulate a device S times slower than this machine (default: %(default)s)",
    )
    g.add_argument(
        "--runtime",
        default="eager",
        choices=["eager", "executorch", "torchscript"],
        help="how the device runs its head: eager PyTorch, or programs from `python -m export` (default: %(default)s)",
    )
    g.add_argument(
        "--programs", help="folder of exported head programs (with manifest.json) for --runtime executorch|torchscript"
    )
    g.add_argument("--json", dest="json_path", help="write the run's report as JSON here")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument(
        "-v", "--verbose", action="store_true", help="print each decision-engine switch as it happens, with its reason"
    )


def _point(text: str) -> int | str:
    if text == "device":
        return text
    return _auto_int(text)


def _auto_int(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def setup_logging(args: argparse.Namespace) -> None:
    """Warnings always; with ``-v`` the engine's switches too, one line each."""
    import logging

    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("edge_sdk").setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    setup_logging(args)
    return TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        point=None if args.point == "auto" else args.point,
        allow_device_only=args.allow_device_only,
        codec=args.codec,
        grad_codec=args.grad_codec,
        staleness=None if args.staleness == "auto" else args.staleness,
        error_feedback=args.error_feedback,
        staleness_guard=args.staleness_guard,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        seed=args.seed,
        token=args.token,
        tls_ca=args.tls_ca,
        runtime=args.runtime,
        programs=args.programs,
        max_steps_per_epoch=args.max_steps_per_epoch,
        device_slowdown=args.device_slowdown,
    )


def write_json(result: TrainResult, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(result.to_json())


def summary_table(result: TrainResult) -> str:
    alone = result.num_blocks and result.point == result.num_blocks
    rows = [
        ("model / dataset", f"{result.model} / {result.dataset}"),
        ("partition point", f"{result.point}" + (" (device-only: every block on the device)" if alone else "")),
        ("codec, staleness K", f"{result.codec}, {result.staleness}" + ("" if result.error_feedback else " (no error feedback)")),
        ("network, device slowdown", f"{result.network}, {result.device_slowdown:g}x"),
        ("epochs, steps", f"{result.epochs}, {result.steps}"),
        ("test accuracy", f"{100 * result.test_accuracy:.2f} %"),
        ("train loss (last epoch)", f"{result.train_loss:.4f}"),
        ("wall time", f"{result.wall_s:.1f} s ({result.steps / result.wall_s if result.wall_s else 0:.1f} steps/s)"),
        ("bytes up / down", f"{result.bytes_up / 1e6:.2f} MB / {result.bytes_down / 1e6:.2f} MB"),
    ]
    for k, v in result.stage_ms.items():
        rows.append((f"stage {k}", f"{v:.2f} ms/step"))
    rows += decision_rows(result)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def decision_rows(result: TrainResult) -> list[tuple[str, str]]:
    """The decision timeline in a few lines: switches, share of steps per
    configuration, the last reason, and what training alone would have cost."""
    rows: list[tuple[str, str]] = []
    history = result.partition_history
    switches = [h for h in history if h.get("switch")]
    if history and history[0].get("reason") != "fixed by the user":
        late = sum(1 for h in switches if h["step"] > 50)
        rows.append(("engine switches", f"{len(switches)} ({late} after step 50)"))
    total = sum(result.steps_by_choice.values())
    if total:
        alone = f"p={result.num_blocks} fp32 K=0"
        shares = sorted(result.steps_by_choice.items(), key=lambda kv: -kv[1])
        rows.append(
            (
                "steps per configuration",
                ", ".join(f"{'device-only' if k == alone else k} {100 * n / total:.0f} %" for k, n in shares),
            )
        )
    decided = [h for h in history if not h.get("waiting") and h.get("reason") != "fixed by the user"]
    if decided:
        reason = decided[-1]["reason"]
        rows.append(("last decision", f"step {decided[-1]['step']}: {reason[:200]}{'...' if len(reason) > 200 else ''}"))
    est = result.device_only_estimate
    trained_alone = result.steps_by_choice.get(f"p={result.num_blocks} fp32 K=0", 0)
    if est and result.train_s > 0 and trained_alone < total:
        ratio = est["train_s"] / result.train_s
        verdict = (
            f"splitting was {ratio:.1f}x faster" if ratio >= 1 else f"training alone would have been {1 / ratio:.1f}x faster"
        )
        how = "measured step" if est["measured"] else "profiled blocks"
        rows.append(
            (
                "device alone (predicted)",
                f"{est['step_ms']:.1f} ms/step ({how}), {est['train_s']:.1f} s for these steps vs {result.train_s:.1f} s "
                f"here: {verdict}",
            )
        )
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="cloud backend URL, e.g. ws://cloud.example:8765 or wss://...")
    add_training_arguments(p)


def run(args: argparse.Namespace) -> int:
    from edge_sdk.client import run_training
    from edge_sdk.progress import ProgressBar
    from edge_sdk.session import TrainingError
    from edge_sdk.training import build_local

    cfg = config_from_args(args)
    try:
        setup = build_local(cfg)
        with ProgressBar(cfg, enabled=args.progress, total=setup.total_steps(cfg)) as bar:
            result = run_training(args.server, cfg, progress=bar.update, setup=setup)
    except (TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary_table(result))
    write_json(result, args.json_path)
    return 0
