"""Dropped connections and killed servers, survived: what each costs, and that
nothing is lost or applied twice (the issue on surviving the network, §4).

1. Cuts. For each number of cuts (0 first: the baseline, in the same process),
   one run of the digits CNN through the shaping proxy on `--network` against an
   in-process cloud server; the proxy cuts every connection at evenly spaced
   steps. Per run: cuts made and survived, steps lost (expected - applied by the
   cloud) and duplicated (applied by the cloud - distinct steps), each
   reconnect's outage (drop to resumed, re-dial backoff included), steps
   re-sent, wall time and its ratio to the run without cuts.
2. Restarts. For each number of restarts (0 first), the same run against
   `python -m cloud_backend serve --state-dir` in its own process, SIGKILLed at
   evenly spaced steps and started again on the same port and state dir. Per
   run: restarts survived (roll backs), steps in the final model on each side,
   steps trained again after roll backs, each restart's outage, wall time ratio.
3. Checkpoint cost per model: bytes and write time (median of 5, fsync
   included) of the cloud's and the device's checkpoint at a typical cut, with
   the optimizer's momentum state present.

Goals: 0 lost, 0 duplicated, every cut and restart survived.

    python bench/faults.py [--cuts 0,5,20] [--restarts 0,2] [--network wifi] [--staleness 2] [--steps 120]

Writes bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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


def _serve(port: int, state_dir: str, log_file) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cloud_backend", "serve", "--port", str(port), "--state-dir", state_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise RuntimeError(f"cloud_backend serve did not start: {line!r}")
    return proc


async def restart_run(restarts: int, network: str, staleness: int, steps: int) -> dict:
    """SIGKILL the cloud ``restarts`` times at evenly spaced steps; it comes back on its state dir."""
    per_epoch = steps // 2
    total = 2 * per_epoch
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile(mode="w+") as log_file:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = TrainConfig(
            epochs=2,
            max_steps_per_epoch=per_epoch,
            batch_size=16,
            point=2,
            codec="int8",
            staleness=staleness,
            evaluate=False,
            checkpoint_every=20,
            checkpoint_dir=str(Path(tmp) / "device"),
        )
        kill_at = {round((i + 1) * total / (restarts + 1)) for i in range(restarts)}
        procs = [_serve(port, str(Path(tmp) / "state"), log_file)]
        try:
            async with ShapingProxy(target=("127.0.0.1", port), network=parse_network(network)) as proxy:

                def restart() -> None:
                    procs[-1].send_signal(signal.SIGKILL)
                    procs[-1].wait()
                    procs.append(_serve(port, str(Path(tmp) / "state"), log_file))

                def on_step(ev):
                    if ev.step in kill_at:
                        kill_at.discard(ev.step)
                        # off the device's loop: it sees the drop at once and re-dials while the cloud starts
                        asyncio.get_running_loop().run_in_executor(None, restart)

                client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg, progress=on_step)
                client.prepare()
                t0 = time.perf_counter()
                result = await client.run()
                wall = time.perf_counter() - t0
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
        log_file.seek(0)
        closed = [int(n) for n in re.findall(r"closed after (\d+) train steps", log_file.read())]
    cloud_steps = closed[-1] if closed else -1
    rollbacks = result.rollbacks
    restart_outages = [r["outage_s"] for r in rollbacks if "outage_s" in r]
    return dict(
        restarts=restarts,
        restarts_survived=len(rollbacks),
        steps_expected=total,
        steps_in_model_cloud=cloud_steps,
        steps_in_model_device=result.steps,
        lost=total - cloud_steps,
        duplicated=max(0, cloud_steps - total),
        steps_trained_again=sum(r["from_step"] - r["to_step"] for r in rollbacks if r["from_step"] is not None),
        reconnects=len(result.reconnects),
        outage_median_s=statistics.median(restart_outages) if restart_outages else 0.0,  # kill to rolled back
        checkpoints=result.checkpoints["saved"],
        device_checkpoint_bytes=result.checkpoints["bytes"],
        wall_s=wall,
    )


CHECKPOINT_MODELS = (("digits_cnn", 1, 32), ("mnist1d_cnn", 2, 32), ("mobilenetv3_large", 3, 32), ("resnet50", 4, 32))


def checkpoint_cost(name: str, point: int, batch: int, repeats: int = 5) -> dict:
    """The cloud's and the device's checkpoint of ``name`` cut at ``point``, after one step
    (so SGD's momentum buffers exist, as in any checkpoint but the first)."""
    import torch

    from cloud_backend.session import CloudSession, SessionConfig
    from edge_sdk import zoo
    from edge_sdk.checkpoints import CheckpointStore
    from edge_sdk.device_checkpoint import DeviceCheckpoint
    from edge_sdk.hello import hello_frame
    from edge_sdk.migration import named_tensors
    from edge_sdk.optim import OptimizerConfig, build_optimizer
    from schemas import codecs
    from schemas import frames as fr

    opt = OptimizerConfig(name="sgd", lr=0.01, momentum=0.9)
    spec = zoo.build(name, seed=0)
    cloud = CloudSession(1, SessionConfig(checkpoints=True))
    cloud.handle(hello_frame(spec, point=point, codec="fp32", staleness=0, optimizer=opt, batch_size=batch))
    assert cloud.plan is not None
    feat = cloud.plan.features[point]
    x = torch.randn(batch, *feat.shape) if feat.dtype.is_floating_point else torch.zeros(batch, *feat.shape, dtype=feat.dtype)
    labels = torch.randint(0, spec.num_classes, (batch,))
    frame = fr.Features(
        step=0,
        epoch=0,
        point=point,
        tensor=codecs.encode_tensor(x, codecs.Codec.NONE)[0],
        labels=codecs.tensor_frame_from_tensor(labels),
        grad_codec="fp32",
    )
    assert any(isinstance(r, fr.Gradients) for r in cloud.handle(frame))  # one step: momentum buffers exist
    head = spec.model.head(point)
    params = [p for p in head.parameters()]
    optimizer = build_optimizer(params, opt)
    head(torch.randn(batch, *spec.input_shape)).float().sum().backward()
    optimizer.step()
    named, buffers = named_tensors(spec.model, range(point))
    from edge_sdk.migration import optimizer_state_by_name

    device_state = optimizer_state_by_name(optimizer, named)
    out: dict = dict(model=name, point=point, num_blocks=spec.model.num_blocks)
    with tempfile.TemporaryDirectory() as tmp:
        cloud_store, device_store = CheckpointStore(Path(tmp) / "cloud"), CheckpointStore(Path(tmp) / "device", keep=1)
        cloud_times, device_times = [], []
        for i in range(repeats):
            tensors, manifest = cloud.checkpoint_state()
            saved = cloud_store.save(i, tensors, manifest)
            cloud_times.append(saved.seconds)
            out["cloud_bytes"] = saved.nbytes
            ck = DeviceCheckpoint.capture(
                step=i, epoch=0, batch=i, head={**named, **buffers}, optimizer_state=device_state, manifest={"k": 1}
            )
            nbytes, seconds = ck.save(device_store)
            device_times.append(seconds)
            out["device_bytes"] = nbytes
    out["cloud_write_ms"] = 1e3 * statistics.median(cloud_times)
    out["device_write_ms"] = 1e3 * statistics.median(device_times)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", default="0,5,20", help="numbers of cuts, one run each; 0 is the baseline (default: %(default)s)")
    ap.add_argument("--restarts", default="0,2", help="numbers of cloud SIGKILL+restarts, one run each (default: %(default)s)")
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
    restart_counts = sorted({int(c) for c in args.restarts.split(",")} | {0})
    restart_rows = [asyncio.run(restart_run(n, args.network, args.staleness, args.steps)) for n in restart_counts]
    base = restart_rows[0]["wall_s"]
    for r in restart_rows:
        r["wall_ratio"] = r["wall_s"] / base
        r["goal_met"] = r["lost"] == 0 and r["duplicated"] == 0 and r["restarts_survived"] == r["restarts"]
        print(
            f"{r['restarts']:>3} cloud SIGKILLs on {args.network}, K={args.staleness}: {r['restarts_survived']} rolled back, "
            f"lost {r['lost']}, duplicated {r['duplicated']}, trained again {r['steps_trained_again']} steps, outage median "
            f"{r['outage_median_s']:.2f} s, {r['checkpoints']} checkpoints, wall {r['wall_s']:.1f} s = "
            f"{r['wall_ratio']:.2f}x no restarts [{'ok' if r['goal_met'] else 'MISSED'}]"
        )
    costs = [checkpoint_cost(*m) for m in CHECKPOINT_MODELS]
    for c in costs:
        print(
            f"checkpoint of {c['model']} at p={c['point']}: cloud {c['cloud_bytes'] / 1e6:.2f} MB in {c['cloud_write_ms']:.1f} ms, "
            f"device {c['device_bytes'] / 1e6:.2f} MB in {c['device_write_ms']:.1f} ms"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "network": args.network,
        "staleness": args.staleness,
        "runs": rows,
        "restarts": restart_rows,
        "checkpoint_cost": costs,
        "all_goals_met": all(r["goal_met"] for r in rows + restart_rows),
    }
    (RESULTS / "faults.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS / 'faults.json'}")
    return 0 if doc["all_goals_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
