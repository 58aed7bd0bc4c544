"""Writing a privacy measurement: the JSON profile, a table, and two pictures.

``privacy.json`` is the *privacy profile* a run reads back with
``--privacy-profile`` (see :mod:`edge_sdk.privacy.floor`); ``privacy.png`` plots
attack PSNR per cut (one line per codec and defence, against the mean-input
baseline) and ``reconstructions.png`` shows private originals next to what the
attacker rebuilt from each cut's features.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edge_sdk.privacy.measure import PrivacyReport


def table(report: PrivacyReport) -> str:
    """One line per (point, codec, defence), deepest leak first within a point."""
    b = report.baseline
    lines = [
        f"{'point':>5}  {'codec':<6} {'defence':<22} {'PSNR dB':>8} {'SSIM':>6} {'MSE':>8} {'test acc':>8} {'defence ms':>10}",
    ]
    for m in sorted(report.measurements, key=lambda m: (m.point, m.defence, m.codec)):
        a = m.attack
        lines.append(
            f"{m.point:>5}  {m.codec:<6} {m.defence:<22} {a.psnr_db:>8.2f} {a.ssim:>6.3f} {a.mse:>8.4f} "
            f"{100 * m.test_accuracy:>7.1f}% {m.defence_ms:>10.2f}"
        )
    lines.append(
        f"chance (the mean public input): PSNR {b.psnr_db:.2f} dB, SSIM {b.ssim:.3f}, MSE {b.mse:.4f}; "
        "higher PSNR/SSIM = the cut reveals more"
    )
    return "\n".join(lines)


def write(report: PrivacyReport, out_dir: Path) -> list[Path]:
    """Write privacy.json, privacy.png and reconstructions.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "privacy.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2))
    tmp.replace(path)
    return [path, plot_psnr(report, out_dir / "privacy.png"), plot_reconstructions(report, out_dir / "reconstructions.png")]


def plot_psnr(report: PrivacyReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_psnr, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, str], list] = {}
    for m in report.measurements:
        series.setdefault((m.defence, m.codec), []).append(m)
    for (defence, codec), ms in sorted(series.items()):
        ms.sort(key=lambda m: m.point)
        ax_psnr.plot([m.point for m in ms], [m.attack.psnr_db for m in ms], marker="o", label=f"{defence}, {codec}")
        ax_acc.scatter([m.attack.psnr_db for m in ms], [100 * m.test_accuracy for m in ms], label=f"{defence}, {codec}")
        for m in ms:
            ax_acc.annotate(f"p={m.point}", (m.attack.psnr_db, 100 * m.test_accuracy), fontsize=7)
    ax_psnr.axhline(report.baseline.psnr_db, color="grey", ls="--", label="chance (mean input)")
    ax_psnr.set_xlabel("cut point p (blocks on the device)")
    ax_psnr.set_ylabel("attack PSNR (dB), higher = more revealed")
    ax_psnr.set_title(f"feature inversion, {report.config.model} on {report.config.dataset}")
    ax_psnr.legend(fontsize=7)
    ax_acc.axvline(report.baseline.psnr_db, color="grey", ls="--")
    ax_acc.set_xlabel("attack PSNR (dB)")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("accuracy vs what the cut reveals")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reconstructions(report: PrivacyReport, path: Path) -> Path:
    """Originals on top, one row per (point, defence) below; 1-D inputs as curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report.examples.items(), key=lambda kv: (kv[0][1] != "none", kv[0][1], kv[0][0]))
    if not rows:
        return path
    originals = rows[0][1][0]
    n = originals.shape[0]
    image = originals.dim() == 4
    if image:
        fig, axes = plt.subplots(len(rows) + 1, n, figsize=(1.2 * n, 1.25 * (len(rows) + 1)), squeeze=False)
        _image_row(axes[0], originals, "private input")
        for i, ((point, defence), (_, rebuilt)) in enumerate(rows, start=1):
            _image_row(axes[i], rebuilt, f"p={point}\n{defence}")
    else:
        fig, axes = plt.subplots(len(rows), n, figsize=(1.8 * n, 1.3 * len(rows)), squeeze=False)
        for i, ((point, defence), (orig, rebuilt)) in enumerate(rows):
            for j in range(n):
                ax = axes[i][j]
                ax.plot(orig[j].reshape(-1).numpy(), color="black", lw=1)
                ax.plot(rebuilt[j].reshape(-1).numpy(), color="tab:red", lw=1)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[i][0].set_ylabel(f"p={point}\n{defence}", fontsize=7)
        axes[0][0].set_title("black: private, red: rebuilt", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _image_row(axes, images: torch.Tensor, label: str) -> None:
    for j, ax in enumerate(axes):
        img = images[j]
        ax.imshow(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).clamp(0, 1).numpy(), cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel(label, fontsize=7)
