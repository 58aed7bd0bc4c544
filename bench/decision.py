"""Decision-engine benchmark (issue 5 §4).

All runs are real emulated training (cloud backend process, shaping proxy, device
slowdown), measured in this one process:

1. **Cost-model accuracy**: per profile, one reference run (default point, int8,
   K=2) calibrates the model with its measured context, exactly as the engine does
   at run time; then for each point x codec (K = the model's best K for that pair)
   the predicted step time is compared with the measured one.
   Goal: median absolute error <= 15 %.
2. **Regret**: per profile, the engine's choice from that calibrated model
   against the best measured configuration of the sweep. Goal: >= 0.9 of the
   best throughput.
3. **Adaptation**: a trace that starts on WiFi and drops to household-IoT
   bandwidth. The engine (auto point/codec/K) must repartition within 30 steps of
   the drop; its wall time is compared with the static configurations of the sweep
   on the same trace (the fastest static configurations run on the trace for real;
   the rest are composed from their measured per-phase step times, see the JSON).

    python bench/decision.py [--slowdown 10] [--steps 30] [--iot-steps 10]
    python bench/decision.py --profiles wifi,4g --skip-adaptation   # cost model only, ~90 s

Writes bench/results/decision.json and bench/results/decision.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_sdk.context import ContextSnapshot
from edge_sdk.decision.cost_model import Choice, LinkEstimate, apply_context
from edge_sdk.decision.setup import build_controller
from edge_sdk.emulation.cli import cloud_process, run_through_proxy
from edge_sdk.emulation.network import PROFILES
from edge_sdk.training import TrainConfig, build_local

RESULTS = ROOT / "bench" / "results"
CODECS = ("fp32", "int8", "int4")


def run(cfg: TrainConfig, network: str, port: int):
    return asyncio.run(run_through_proxy(cfg, network, port, None, build_local(cfg)))


def step_ms(result) -> float:
    return 1e3 * result.train_s / result.steps


def a_priori_inputs(base: dict, profile: str):
    """Decision inputs before any measurement: this machine's profile x slowdown,
    the link as the profile states it."""
    cfg = TrainConfig(**base)  # auto point/codec/K: builds the controller
    setup = build_local(cfg)
    controller = build_controller(cfg, setup, Choice(setup.point, "int8", 2))
    link = PROFILES[profile]
    return controller, controller.base_inputs.with_link(
        LinkEstimate(uplink_bps=link.uplink_bps, downlink_bps=link.downlink_bps, rtt_s=link.rtt_s)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="wifi,4g,iot")
    ap.add_argument("--slowdown", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=30, help="steps per configuration on wifi/4g")
    ap.add_argument("--iot-steps", type=int, default=10, help="steps per configuration on iot (slow)")
    ap.add_argument("--wifi-seconds", type=float, default=10.0, help="adaptation trace: seconds of wifi before the drop")
    ap.add_argument("--trace-steps", type=int, default=360, help="adaptation run length in steps")
    ap.add_argument("--real-statics", type=int, default=2, help="static configurations run for real on the trace")
    ap.add_argument("--sweep-from", help="reuse the sweep and regret of an earlier decision.json; run only the adaptation")
    ap.add_argument("--skip-adaptation", action="store_true", help="only the sweep and regret (quick cost-model checks)")
    ap.add_argument("--out", default=str(RESULTS / "decision.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    base = dict(
        model="digits_cnn", dataset="digits", epochs=1, batch_size=32, device_slowdown=args.slowdown, evaluate=False, seed=0
    )
    report: dict = {"config": dict(base), "sweep": [], "regret": [], "adaptation": {}}
    with cloud_process(["--threads", "1"]) as (_proc, port):
        # ---------------------------------------------------------------- sweep
        if args.sweep_from:
            earlier = json.loads(Path(args.sweep_from).read_text())
            report["sweep"], report["regret"] = earlier["sweep"], earlier["regret"]
        for profile in [] if args.sweep_from else args.profiles.split(","):
            steps = args.iot_steps if profile == "iot" else args.steps
            controller, inputs = a_priori_inputs({**base, "max_steps_per_epoch": steps}, profile)
            policy = controller.policy
            # Calibrate once, as the engine does at run time: measure one reference
            # configuration, then predict every *other* one from that context.
            ref = Choice(controller.current.point, "int8", 2)
            ref_run = run(
                TrainConfig(**base, max_steps_per_epoch=steps, point=ref.point, codec=ref.codec, staleness=ref.staleness),
                profile,
                port,
            )
            calibrated = apply_context(inputs, _snapshot(ref_run.context), ref)
            rows = []
            for point in inputs.cut_points:
                for codec in CODECS:
                    pred, _ = policy.best_for(calibrated, point, codec)
                    cfg = TrainConfig(**base, max_steps_per_epoch=steps, point=point, codec=codec, staleness=pred.K)
                    measured = step_ms(run(cfg, profile, port))
                    row = dict(
                        profile=profile,
                        point=point,
                        codec=codec,
                        staleness=pred.K,
                        predicted_ms=1e3 * pred.step_time_s,
                        measured_ms=measured,
                        rel_error=(1e3 * pred.step_time_s - measured) / measured,
                    )
                    rows.append(row)
                    print(
                        f"{profile:5s} p={point} {codec:5s} K={pred.K}: predicted {row['predicted_ms']:8.1f} ms, "
                        f"measured {measured:8.1f} ms ({100 * row['rel_error']:+.0f} %)",
                        flush=True,
                    )
            report["sweep"] += rows
            decision = policy.decide(calibrated, None, calibrated.remaining_steps)
            choice = decision.choice
            chosen = next(
                (r for r in rows if (r["point"], r["codec"], r["staleness"]) == (choice.point, choice.codec, choice.staleness)),
                None,
            )
            if chosen is None:
                cfg = TrainConfig(
                    **base, max_steps_per_epoch=steps, point=choice.point, codec=choice.codec, staleness=choice.staleness
                )
                chosen = dict(
                    point=choice.point,
                    codec=choice.codec,
                    staleness=choice.staleness,
                    measured_ms=step_ms(run(cfg, profile, port)),
                )
            best = min(rows, key=lambda r: r["measured_ms"])
            report["regret"].append(
                dict(
                    profile=profile,
                    engine=dict(
                        point=choice.point, codec=choice.codec, staleness=choice.staleness, measured_ms=chosen["measured_ms"]
                    ),
                    best=dict(
                        point=best["point"], codec=best["codec"], staleness=best["staleness"], measured_ms=best["measured_ms"]
                    ),
                    throughput_ratio=best["measured_ms"] / chosen["measured_ms"],
                    reason=decision.reason,
                )
            )

        # ----------------------------------------------------------- adaptation
        if not args.skip_adaptation:
            report["adaptation"] = _adaptation(args, base, report, port)

    errors = [abs(r["rel_error"]) for r in report["sweep"]]
    report["median_abs_error"] = statistics.median(errors)
    report["goal_median_error_15pct"] = report["median_abs_error"] <= 0.15
    report["goal_regret_0_9"] = all(r["throughput_ratio"] >= 0.9 for r in report["regret"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    _print_tables(report)
    _plot(report, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


def _adaptation(args, base: dict, report: dict, port: int) -> dict:
    """The wifi -> iot trace: the adaptive run against the best static configurations."""
    wifi, iot = PROFILES["wifi"], PROFILES["iot"]
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
        f.write("time_s,up_mbps,down_mbps,rtt_ms\n")
        f.write(f"0,{wifi.uplink_bps / 1e6},{wifi.downlink_bps / 1e6},{1e3 * wifi.rtt_s}\n")
        f.write(f"{args.wifi_seconds},{iot.uplink_bps / 1e6},{iot.downlink_bps / 1e6},{1e3 * iot.rtt_s}\n")
        trace = f.name
    # whole epochs (no evaluation) until at least --trace-steps steps
    per_epoch = build_local(TrainConfig(**base, point=1)).steps_per_epoch(TrainConfig(**base))
    epochs = -(-args.trace_steps // per_epoch)
    trace_steps = epochs * per_epoch
    trace_base = {**base, "epochs": epochs}
    adaptive = run(TrainConfig(**trace_base), f"trace:{trace}", port)
    drop_step = _step_at(adaptive, args.wifi_seconds)
    switches = [h for h in adaptive.partition_history if h.get("switch") and h["step"] >= (drop_step or 0)]
    react = (switches[0]["step"] - drop_step) if (switches and drop_step is not None) else None
    # static configurations on the same trace
    sweep_wifi = {(r["point"], r["codec"], r["staleness"]): r for r in report["sweep"] if r["profile"] == "wifi"}
    sweep_iot = {(r["point"], r["codec"]): r for r in report["sweep"] if r["profile"] == "iot"}
    statics = []
    for key, rw in sweep_wifi.items():
        ri = sweep_iot.get(key[:2])
        if ri is None:
            continue
        n_wifi = min(trace_steps, int(1e3 * args.wifi_seconds / rw["measured_ms"]))
        composed = (n_wifi * rw["measured_ms"] + (trace_steps - n_wifi) * ri["measured_ms"]) / 1e3
        statics.append(dict(point=key[0], codec=key[1], staleness=key[2], composed_s=composed))
    statics.sort(key=lambda r: r["composed_s"])
    for s in statics[: args.real_statics]:
        cfg = TrainConfig(**trace_base, point=s["point"], codec=s["codec"], staleness=s["staleness"])
        s["measured_s"] = run(cfg, f"trace:{trace}", port).train_s
        print(
            f"static p={s['point']} {s['codec']} K={s['staleness']} on the trace: {s['measured_s']:.1f} s "
            f"(composed {s['composed_s']:.1f} s)",
            flush=True,
        )
    best_static = min((s.get("measured_s", s["composed_s"]) for s in statics), default=None)
    adaptation = dict(
        trace=f"wifi {args.wifi_seconds:g} s then iot",
        steps=trace_steps,
        drop_step=drop_step,
        first_switch_after_drop=switches[0] if switches else None,
        steps_to_react=react,
        adaptive_s=adaptive.train_s,
        best_static_s=best_static,
        statics=statics,
        partition_history=adaptive.partition_history,
        goal_react_within_30=react is not None and react <= 30,
        goal_beats_every_static=best_static is not None and adaptive.train_s < best_static,
    )
    print(
        f"adaptive on the trace: {adaptive.train_s:.1f} s, drop at step {drop_step}, reacted after {react} steps; "
        f"best static {_fmt(best_static)} s",
        flush=True,
    )
    return adaptation


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _snapshot(d: dict) -> ContextSnapshot:
    blocks = {k: {int(i): v for i, v in d.get(k, {}).items()} for k in ("cloud_block_ms", "edge_block_ms")}
    return ContextSnapshot(**{**d, **blocks})


def _step_at(result, seconds: float) -> int | None:
    """The step that was running when the trace switched (from the per-step times)."""
    t = result.step_times
    for i, ts in enumerate(t):
        if ts >= seconds:
            return i
    return None


def _print_tables(report: dict) -> None:
    print(f"\ncost model: median |error| {100 * report['median_abs_error']:.1f} % over {len(report['sweep'])} configurations")
    print("| profile | engine choice | measured ms | best of sweep | measured ms | throughput ratio |")
    print("|---|---|---|---|---|---|")
    for r in report["regret"]:
        e, b = r["engine"], r["best"]
        print(
            f"| {r['profile']} | p={e['point']} {e['codec']} K={e['staleness']} | {e['measured_ms']:.1f} | "
            f"p={b['point']} {b['codec']} K={b['staleness']} | {b['measured_ms']:.1f} | {r['throughput_ratio']:.2f} |"
        )
    a = report["adaptation"]
    if a:
        print(
            f"adaptation: drop at step {a['drop_step']}, first switch {a['steps_to_react']} steps later, "
            f"adaptive {a['adaptive_s']:.1f} s vs best static {_fmt(a['best_static_s'])} s"
        )


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = {"wifi": "tab:blue", "4g": "tab:orange", "iot": "tab:red", "5g": "tab:green"}
    for r in report["sweep"]:
        ax1.scatter(r["measured_ms"], r["predicted_ms"], color=colors.get(r["profile"], "k"), s=18)
    lim = [
        min(min(r["measured_ms"], r["predicted_ms"]) for r in report["sweep"]) * 0.8,
        max(max(r["measured_ms"], r["predicted_ms"]) for r in report["sweep"]) * 1.2,
    ]
    ax1.plot(lim, lim, "k--", lw=1)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("measured step time (ms)")
    ax1.set_ylabel("predicted step time (ms)")
    ax1.set_title(f"cost model, median |error| {100 * report['median_abs_error']:.0f} %")
    for name in dict.fromkeys(r["profile"] for r in report["sweep"]):
        ax1.scatter([], [], color=colors.get(name, "k"), label=name)
    ax1.legend()
    hist = report["adaptation"].get("partition_history", [])
    ax2.step([h["step"] for h in hist], [h["point"] for h in hist], where="post", label="partition point")
    if report["adaptation"].get("drop_step") is not None:
        ax2.axvline(report["adaptation"]["drop_step"], color="tab:red", ls="--", label="wifi -> iot")
    ax2.set_xlabel("step")
    ax2.set_ylabel("partition point")
    ax2.set_title("adaptation on the wifi -> iot trace")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
