"""Pipeline speed benchmark (issue 4 §7).

For each link profile, with a device `--slowdown` times slower than this machine
and one partition point, measures in one run:

* sequential split training (K = 0): wall time per step and the per-stage times
  T1 (device), T2 (up), T3 (cloud), T4 (down) — with K = 0 nothing queues, so
  these are clean;
* pipelined split training with K sized to fill the pipe from those measured
  stages (smallest K with (K+1) max(T) >= sum(T));
* device-only training (every block on the device, same slowdown).

Goals checked and printed: pipelined step time <= 1.2 x max(T1..T4), and
pipelined speed-up over K = 0 >= 0.8 x sum(T)/max(T).

    python bench/pipeline.py [--profiles wifi,4g,iot] [--slowdown 10] [--steps 40]

Writes bench/results/pipeline.json and bench/results/pipeline.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_sdk.emulation.cli import cloud_process, run_through_proxy
from edge_sdk.local import train_locally
from edge_sdk.training import TrainConfig, build_local

RESULTS = ROOT / "bench" / "results"


def split_run(cfg: TrainConfig, network: str, port: int):
    setup = build_local(cfg)
    return asyncio.run(run_through_proxy(cfg, network, port, None, setup))


def stages_of(result) -> dict[str, float]:
    s = result.stage_ms
    return {"T1": s["edge"], "T2": s["up"], "T3": s["cloud"], "T4": s["down"]}


def fill_staleness(stages: dict[str, float], cap: int) -> int:
    """The smallest K with (K+1) max(T) >= sum(T), plus one step of slack: stage
    times jitter on a real machine, and a window that is exactly full stalls on
    every late frame."""
    t_max, t_sum = max(stages.values()), sum(stages.values())
    return min(cap, max(0, math.ceil(t_sum / t_max)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="wifi,4g,iot")
    ap.add_argument("--slowdown", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=40, help="training steps per configuration")
    ap.add_argument("--model", default="digits_cnn")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--point", type=int, default=1, help="partition point (default 1: a light head, as a slow device wants)")
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--grad-codec", default="fp16")
    ap.add_argument("--max-k", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "pipeline.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    base = dict(
        model=args.model,
        dataset=args.dataset,
        epochs=1,
        batch_size=32,
        point=args.point,
        codec=args.codec,
        grad_codec=args.grad_codec,
        max_steps_per_epoch=args.steps,
        device_slowdown=args.slowdown,
        seed=0,
    )
    rows = []
    with cloud_process(["--threads", "1"]) as (_proc, port):
        device_only = train_locally(TrainConfig(**base), slowdown=args.slowdown)
        dev_step = 1e3 * device_only.train_s / device_only.steps
        for profile in args.profiles.split(","):
            seq = split_run(TrainConfig(**base, staleness=0), profile, port)
            stages = stages_of(seq)
            k = fill_staleness(stages, args.max_k)
            pipe = split_run(TrainConfig(**base, staleness=k), profile, port)
            seq_step = 1e3 * seq.train_s / seq.steps
            pipe_step = 1e3 * pipe.train_s / pipe.steps
            t_max, t_sum = max(stages.values()), sum(stages.values())
            own = stages_of(pipe)  # the pipelined run's own stage times ("measured in the same run")
            own_max = max(own.values())
            row = dict(
                profile=profile,
                stages_ms=stages,
                bottleneck_ms=t_max,
                sum_ms=t_sum,
                staleness_filled=k,
                sequential_step_ms=seq_step,
                pipelined_step_ms=pipe_step,
                device_only_step_ms=dev_step,
                pipelined_stages_ms=own,
                pipelined_bottleneck_ms=own_max,
                speedup_over_sequential=seq_step / pipe_step,
                ideal_speedup=t_sum / t_max,
                speedup_over_device_only=dev_step / pipe_step,
                epoch_s={
                    k_: v * math.ceil(1437 / 32) / 1e3
                    for k_, v in (("sequential", seq_step), ("pipelined", pipe_step), ("device_only", dev_step))
                },
                goal_bottleneck=pipe_step <= 1.2 * own_max,
                goal_speedup=seq_step / pipe_step >= 0.8 * t_sum / t_max,
            )
            rows.append(row)
            print(_line(row), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(config=base, rows=rows), indent=2))
    _plot(rows, out.with_suffix(".png"))
    print(_table(rows))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _line(r: dict) -> str:
    s = r["stages_ms"]
    return (
        f"{r['profile']}: T1..T4 = {s['T1']:.1f} {s['T2']:.1f} {s['T3']:.1f} {s['T4']:.1f} ms, K={r['staleness_filled']}, "
        f"seq {r['sequential_step_ms']:.1f} ms, pipe {r['pipelined_step_ms']:.1f} ms, device-only {r['device_only_step_ms']:.1f} ms"
    )


def _table(rows: list[dict]) -> str:
    head = (
        "| profile | T1 | T2 | T3 | T4 (K=0 run) | K | K=0 step | pipelined step | max T (pipelined run) | "
        "pipe / max T | device-only step | speed-up over K=0 (0.8 x ideal) | goals |"
    )
    sep = "|" + "---|" * 13
    lines = [head, sep]
    for r in rows:
        s = r["stages_ms"]
        goals = ("ok" if r["goal_bottleneck"] else "MISS") + "/" + ("ok" if r["goal_speedup"] else "MISS")
        lines.append(
            f"| {r['profile']} | {s['T1']:.1f} | {s['T2']:.1f} | {s['T3']:.1f} | {s['T4']:.1f} | "
            f"{r['staleness_filled']} | {r['sequential_step_ms']:.1f} | {r['pipelined_step_ms']:.1f} | {r['pipelined_bottleneck_ms']:.1f} | "
            f"{r['pipelined_step_ms'] / r['pipelined_bottleneck_ms']:.2f} | {r['device_only_step_ms']:.1f} | "
            f"{r['speedup_over_sequential']:.2f} ({0.8 * r['ideal_speedup']:.2f}) | {goals} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["profile"] for r in rows]
    width = 0.2
    xs = range(len(rows))
    for i, (key, label) in enumerate(
        (
            ("sequential_step_ms", "split, K=0"),
            ("pipelined_step_ms", "split, pipelined"),
            ("device_only_step_ms", "device only"),
            ("bottleneck_ms", "bound max(T)"),
        )
    ):
        ax.bar([x + (i - 1.5) * width for x in xs], [r[key] for r in rows], width, label=label)
    ax.set_xticks(list(xs), names)
    ax.set_yscale("log")
    ax.set_ylabel("ms per training step (log)")
    ax.set_title("Step time per link profile")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
