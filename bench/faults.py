"""Dropped connections, survived: what each one costs, and that nothing is lost
or applied twice (the issue on surviving the network, §4).

For each number of cuts (0 first: the baseline, in the same process), one run of
the digits CNN through the shaping proxy on `--network` against an in-process
cloud server; the proxy cuts every connection at evenly spaced steps. Per run:
cuts made and survived, steps lost (expected - applied by the cloud) and
duplicated (applied by the cloud - distinct steps), each reconnect's outage
(drop to resumed, re-dial backoff included), steps re-sent, wall time and its
ratio to the run without cuts. Goals: 0 lost, 0 duplicated, every cut survived.

    python bench/faults.py [--cuts 0,5,20] [--network wifi] [--staleness 2] [--steps 120]

Writes bench/results/faults.json. Checkpoint sizes and server restarts are not
measured: there are no checkpoints yet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_backend.server import CloudServer, ServerConfig
from edge_sdk.client import EdgeClient
from edge_sdk.emulation.network import parse_network
from edge_sdk.emulation.proxy import ShapingProxy
from edge_sdk.training import TrainConfig

RESULTS = ROOT / "bench" / "results"


async def one_run(cuts: int, network: str, staleness: int, steps: int) -> dict:
    per_epoch = steps // 2
    cfg = TrainConfig(
        epochs=2, max_steps_per_epoch=per_epoch, batch_size=16, point=2, codec="int8", staleness=staleness, evaluate=False
    )
    total = 2 * per_epoch
    cut_at = {round((i + 1) * total / (cuts + 1)) for i in range(cuts)}
    async with CloudServer(ServerConfig(port=0)) as server:
        async with ShapingProxy(target=("127.0.0.1", server.port), network=parse_network(network)) as proxy:

            def on_step(ev):
                if ev.step in cut_at:
                    cut_at.discard(ev.step)
                    proxy.cut()

            client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg, progress=on_step)
            client.prepare()
            t0 = time.perf_counter()
            result = await client.run()
            wall = time.perf_counter() - t0
        await server.wait_idle(30)
        (closed,) = server.stats.closed
    outages = [r["outage_s"] for r in result.reconnects]
    return dict(
        cuts=cuts,
        cuts_made=proxy.cuts,
        reconnects=len(result.reconnects),
        steps_expected=total,
        steps_applied_cloud=closed["steps"],
        steps_applied_device=result.steps,
        lost=total - closed["steps"],
        duplicated=closed["steps"] - (closed["last_step"] + 1),
        resent=sum(r["resent"] for r in result.reconnects),
        outage_median_s=statistics.median(outages) if outages else 0.0,
        outage_max_s=max(outages) if outages else 0.0,
        wall_s=wall,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", default="0,5,20", help="numbers of cuts, one run each; 0 is the baseline (default: %(default)s)")
    ap.add_argument("--network", default="wifi", help="link profile (default: %(default)s)")
    ap.add_argument("--staleness", type=int, default=2, help="K (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=120, help="training steps per run, over 2 epochs (default: %(default)s)")
    args = ap.parse_args()
    counts = sorted({int(c) for c in args.cuts.split(",")} | {0})
    rows = [asyncio.run(one_run(n, args.network, args.staleness, args.steps)) for n in counts]
    base = rows[0]["wall_s"]
    for r in rows:
        r["wall_ratio"] = r["wall_s"] / base
        r["goal_met"] = r["lost"] == 0 and r["duplicated"] == 0 and r["reconnects"] >= r["cuts"]
        print(
            f"{r['cuts']:>3} cuts on {args.network}, K={args.staleness}: {r['reconnects']} resumed, lost {r['lost']}, "
            f"duplicated {r['duplicated']}, re-sent {r['resent']}, outage median {1e3 * r['outage_median_s']:.0f} ms "
            f"(max {1e3 * r['outage_max_s']:.0f}), wall {r['wall_s']:.1f} s = {r['wall_ratio']:.2f}x no cuts "
            f"[{'ok' if r['goal_met'] else 'MISSED'}]"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"network": args.network, "staleness": args.staleness, "runs": rows, "all_goals_met": all(r["goal_met"] for r in rows)}
    (RESULTS / "faults.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS / 'faults.json'}")
    return 0 if doc["all_goals_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
