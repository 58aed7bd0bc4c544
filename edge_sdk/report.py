"""Run reports: the JSON plus plots people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

from edge_sdk.training import TrainResult


def write_report(result: TrainResult, out_dir: Path) -> list[Path]:
    """Write ``run.json`` and ``training.png`` (loss/accuracy over wall time, per-stage times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "run.json"
    json_path.write_text(result.to_json())

    fig, (ax_loss, ax_stage) = plt.subplots(1, 2, figsize=(11, 4))
    t = [r["wall_s"] for r in result.timeline]
    ax_loss.plot(t, [r["train_loss"] for r in result.timeline], "o-", color="tab:red", label="train loss")
    ax_loss.set_xlabel("wall time (s)")
    ax_loss.set_ylabel("train loss", color="tab:red")
    ax_acc = ax_loss.twinx()
    ax_acc.plot(t, [100 * r["test_accuracy"] for r in result.timeline], "s-", color="tab:blue", label="test accuracy")
    ax_acc.set_ylabel("test accuracy (%)", color="tab:blue")
    ax_loss.set_title(f"{result.model} on {result.dataset}: p={result.point}, {result.codec}, K={result.staleness}")
    mark_switches(ax_loss, result)
    ax_loss.set_xlim(left=0)

    stages = {k: v for k, v in result.stage_ms.items() if k in ("edge", "up", "cloud", "down")}
    ax_stage.bar(list(stages), list(stages.values()), color=["tab:green", "tab:orange", "tab:purple", "tab:brown"][: len(stages)])
    ax_stage.set_ylabel("ms per step")
    ax_stage.set_title(f"per-stage time ({result.network}, device {result.device_slowdown:g}x)")
    for i, v in enumerate(stages.values()):
        ax_stage.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom")
    fig.tight_layout()
    png = out_dir / "training.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [json_path, png]


def mark_switches(ax, result: TrainResult) -> None:
    """A dashed line where the engine switched, labelled with what it switched to."""
    for h in result.partition_history:
        if not h.get("switch") or h.get("time_s") is None:
            continue
        label = (
            "device-only"
            if result.num_blocks and h["point"] == result.num_blocks
            else f"p={h['point']} {h['codec']} K={h['staleness']}"
        )
        ax.axvline(h["time_s"], color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(
            label,
            (h["time_s"], 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color="grey",
        )
