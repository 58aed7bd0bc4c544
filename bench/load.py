"""Capacity of one cloud server (issue 16 §1): N devices against one `serve`.

For N = 1, 4, 16, 64 emulated devices (digits_cnn, a light head at ``--point``,
each device on its own shaped link through its own proxy, the devices spread over
``--device-procs`` processes so device emulation does not take the server's
cores), every device trains ``--steps`` steps against one
``python -m cloud_backend serve`` subprocess. Per N:

* aggregate steps/s (all devices' steps over the wall time from the first
  device's start to the last one's end);
* the cloud's step latency p50/p99, from the server's own Prometheus histogram
  (``--metrics-port``; quantiles interpolated within a bucket, as Prometheus's
  ``histogram_quantile`` does);
* memory per session: the server's peak RSS over its idle RSS, per session, and
  the session's own estimate (the ``splitreplay_session_memory_bytes`` gauge);
* errors (a device whose run raised) and lost steps (``--steps`` x N minus the
  steps the server counted, and minus the steps the devices counted).

The compute bound is measured in the same run: the tail's step alone, one
`CloudSession` in this process with the server's thread setting, no network, no
framing; its rate (1 / step time) is what one core's worth of serving could at
best do for one session at a time. Goal: at 64 sessions aggregate steps/s >=
0.8 x that bound, with 0 errors and 0 lost steps.

``--threads`` compares torch intra-op thread settings of the server side by side
(e.g. ``1,0``: one thread per op vs torch's default of one per core) at
``--threads-n`` sessions.

    python bench/load.py                          # N = 1,4,16,64 x 1000 steps, ~10 min on 2 cores
    python bench/load.py --sessions 1,4 --steps 200  # a quick look

Writes bench/results/load.json and bench/results/load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
THROUGHPUT_GOAL = 0.8
STEPS_PER_EPOCH = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _epochs(steps: int) -> tuple[int, int]:
    """(steps per epoch, epochs) for exactly ``steps`` steps (digits has 44 batches of 32 per epoch)."""
    per_epoch = next(d for d in range(min(STEPS_PER_EPOCH, steps), 0, -1) if steps % d == 0)
    return per_epoch, steps // per_epoch


def _config(args: argparse.Namespace):
    from edge_sdk.training import TrainConfig

    per_epoch, epochs = _epochs(args.steps)
    return TrainConfig(
        model="digits_cnn",
        dataset="digits",
        point=args.point,
        codec=args.codec,
        staleness=args.staleness,
        batch_size=32,
        epochs=epochs,
        max_steps_per_epoch=per_epoch,
        evaluate=False,
    )


async def _devices(port: int, count: int, first_seed: int, args: argparse.Namespace) -> list[dict]:
    """``count`` devices on this process's loop, each through its own shaping proxy."""
    from dataclasses import replace

    from edge_sdk.client import EdgeClient
    from edge_sdk.emulation.network import parse_network
    from edge_sdk.emulation.proxy import ShapingProxy

    base = _config(args)

    async def one(i: int) -> dict:
        cfg = replace(base, seed=first_seed + i)
        t0 = time.monotonic()
        try:
            async with ShapingProxy(target=("127.0.0.1", port), network=parse_network(args.network)) as proxy:
                client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg)
                result = await client.run()
            return {"steps": result.steps, "start": t0, "end": time.monotonic(), "error": None}
        except Exception as exc:  # noqa: BLE001 - counted and reported, the other devices go on
            return {"steps": 0, "start": t0, "end": time.monotonic(), "error": f"{type(exc).__name__}: {exc}"}

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def _device_proc(port: int, count: int, first_seed: int, args: argparse.Namespace, out) -> None:
    import torch

    torch.set_num_threads(1)  # many light heads on one loop: no intra-op threads to fight over
    from edge_sdk.quiet import quiet_third_party

    quiet_third_party()
    out.put(asyncio.run(_devices(port, count, first_seed, args)))


def _scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return {m.name: m.samples for m in text_string_to_metric_families(r.read().decode())}


def _quantile(samples: list, q: float) -> float | None:
    """``histogram_quantile`` over a scraped histogram's cumulative buckets."""
    buckets = sorted(((float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket")), key=lambda b: b[0])
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-12)
        prev_le, prev_n = le, n
    return prev_le


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def compute_bound(args: argparse.Namespace, threads: int) -> dict:
    """The tail's step alone: one CloudSession in this process, the same frames a device sends."""
    import torch

    from cloud_backend.session import CloudSession
    from edge_sdk import zoo
    from edge_sdk.hello import hello_frame
    from edge_sdk.optim import OptimizerConfig
    from schemas import codecs
    from schemas import frames as fr

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        spec = zoo.build("digits_cnn", seed=0)
        hello = hello_frame(
            spec, point=args.point, codec=args.codec, staleness=args.staleness, optimizer=OptimizerConfig(), batch_size=32
        )
        session = CloudSession(1)
        session.handle(fr.decode(fr.encode(fr.Envelope(frame=hello))).frame)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 1, 8, 8, generator=g)
        with torch.no_grad():
            f = spec.model.head(args.point)(x)
        tf, _ = codecs.encode_tensor(f, codecs.Codec.parse(args.codec))
        y = codecs.tensor_frame_from_tensor(torch.randint(0, 10, (32,), generator=g))
        times = []
        for step in range(300):
            frame = fr.Features(step=step, epoch=0, point=args.point, tensor=tf, labels=y, train=True, grad_codec="fp16")
            data = fr.encode(fr.Envelope(frame=frame))
            t0 = time.perf_counter()
            session.handle(fr.decode(data).frame)
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times[50:])
    finally:
        torch.set_num_threads(saved)
    return {"step_ms": 1e3 * step_s, "steps_per_s": 1.0 / step_s, "threads": threads or saved}


def run_load(n: int, args: argparse.Namespace, threads: int) -> dict:
    from edge_sdk.emulation.cli import cloud_process

    metrics_port = _free_port()
    extra = ["--max-sessions", str(max(n, 1)), "--metrics-port", str(metrics_port), "--threads", str(threads)]
    with cloud_process(extra) as (proc, port):
        idle_kib = _rss_kib(proc.pid, "VmRSS")
        procs = min(args.device_procs, n)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        per = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        workers, seed = [], 0
        for count in per:
            w = ctx.Process(target=_device_proc, args=(port, count, seed, args, out))
            w.start()
            workers.append(w)
            seed += count
        cpu0 = _cpu_s(proc.pid)
        devices: list[dict] = []
        busiest: dict = {}
        deadline = time.monotonic() + args.timeout
        try:
            while len(devices) < n:  # collect results; meanwhile sample the gauges while sessions run
                try:
                    devices += out.get(timeout=1.0)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{n} devices did not finish within {args.timeout:g} s") from None
                    if any(w.exitcode not in (None, 0) for w in workers):
                        raise RuntimeError("a device process died; see its traceback above") from None
                    sample = _scrape(metrics_port)
                    active = sample["splitreplay_sessions_active"][0].value
                    if active >= (busiest.get("active") or 0):
                        busiest = {"active": active, "memory": sample["splitreplay_session_memory_bytes"]}
            server_cpu_s = _cpu_s(proc.pid) - cpu0
        finally:
            for w in workers:
                w.join(timeout=30)
                if w.is_alive():
                    w.terminate()
        metrics = _scrape(metrics_port)
        peak_kib = _rss_kib(proc.pid, "VmHWM")
    steps_server = int(next(s.value for s in metrics["splitreplay_train_steps"] if s.name.endswith("_total")))
    steps_devices = sum(d["steps"] for d in devices)
    wall = max(d["end"] for d in devices) - min(d["start"] for d in devices)
    hist = metrics["splitreplay_step_seconds"]
    errors = [d["error"] for d in devices if d["error"]]
    return {
        "sessions": n,
        "threads": threads,
        "steps_expected": n * args.steps,
        "steps_server": steps_server,
        "steps_devices": steps_devices,
        "lost_steps": n * args.steps - min(steps_server, steps_devices),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": wall,
        "steps_per_s": steps_server / wall if wall > 0 else 0.0,
        "step_p50_ms": 1e3 * (_quantile(hist, 0.5) or 0.0),
        "step_p99_ms": 1e3 * (_quantile(hist, 0.99) or 0.0),
        "server_cpu_ms_per_step": 1e3 * server_cpu_s / max(1, steps_server),
        "max_sessions_seen": busiest.get("active", 0),
        "session_estimate_mib": statistics.mean(m.value for m in busiest["memory"]) / 2**20 if busiest.get("memory") else None,
        "server_idle_rss_mib": idle_kib / 1024,
        "server_peak_rss_mib": peak_kib / 1024,
        "rss_per_session_mib": (peak_kib - idle_kib) / 1024 / max(n, 1),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r["threads"] == report["config"]["server_threads"]]
    ns = [r["sessions"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ns, [r["steps_per_s"] for r in runs], "o-", label="aggregate steps/s")
    bound = report["compute_bound"]["steps_per_s"]
    a.axhline(bound, color="gray", ls="--", label=f"tail compute bound ({bound:.0f}/s)")
    a.axhline(THROUGHPUT_GOAL * bound, color="gray", ls=":", label=f"goal {THROUGHPUT_GOAL} x bound")
    a.set_xscale("log", base=2)
    a.set_xlabel("sessions")
    a.set_ylabel("steps/s, all sessions")
    a.legend(fontsize=8)
    b.plot(ns, [r["step_p50_ms"] for r in runs], "o-", label="p50")
    b.plot(ns, [r["step_p99_ms"] for r in runs], "s-", label="p99")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("sessions")
    b.set_ylabel("cloud step latency, ms")
    b.legend(fontsize=8)
    fig.suptitle(f"one server, {report['config']['network']} links, digits_cnn p={report['config']['point']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,4,16,64", help="device counts to run (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=1000, help="train steps per device (default: %(default)s)")
    ap.add_argument("--network", default="wifi", help="each device's link profile (default: %(default)s)")
    ap.add_argument("--point", type=int, default=1, help="cut: the device runs blocks [0, point) (default: %(default)s)")
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--staleness", type=int, default=4, help="K of every device (default: %(default)s)")
    ap.add_argument("--device-procs", type=int, default=2, help="processes the devices are spread over (default: %(default)s)")
    ap.add_argument("--server-threads", type=int, default=1, help="the server's torch intra-op threads (0: torch's default)")
    ap.add_argument("--threads", default="1,0", help="thread settings compared at --threads-n sessions ('' to skip)")
    ap.add_argument("--threads-n", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds one load level may take")
    ap.add_argument("--out", default=str(RESULTS / "load.json"))
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.sessions.split(",") if x]
    report: dict = {"config": vars(args), "runs": [], "cpus": os.cpu_count()}
    report["compute_bound"] = compute_bound(args, args.server_threads)
    print(
        f"tail compute bound: {report['compute_bound']['step_ms']:.2f} ms/step = {report['compute_bound']['steps_per_s']:.0f} steps/s"
    )
    for n in levels:
        r = run_load(n, args, args.server_threads)
        report["runs"].append(r)
        print(
            f"N={n:3d}  {r['steps_per_s']:7.0f} steps/s  p50 {r['step_p50_ms']:6.2f} ms  p99 {r['step_p99_ms']:7.2f} ms  "
            f"{r['rss_per_session_mib']:5.1f} MiB/session (estimate {r['session_estimate_mib'] or 0:.1f})  "
            f"server CPU {r['server_cpu_ms_per_step']:.2f} ms/step  errors {r['errors']}  lost {r['lost_steps']}"
        )
    for t in [int(x) for x in args.threads.split(",") if x]:
        if t == args.server_threads and args.threads_n in levels:
            continue
        r = run_load(args.threads_n, args, t)
        report["runs"].append(r)
        print(f"threads={t or 'default'} N={args.threads_n}: {r['steps_per_s']:.0f} steps/s, p99 {r['step_p99_ms']:.1f} ms")
    top = max((r for r in report["runs"] if r["threads"] == args.server_threads), key=lambda r: r["sessions"])
    ratio = top["steps_per_s"] / report["compute_bound"]["steps_per_s"]
    report["goals"] = {
        "sessions": top["sessions"],
        "throughput_over_bound": ratio,
        "throughput_goal": ratio >= THROUGHPUT_GOAL,
        "no_errors": all(r["errors"] == 0 for r in report["runs"]),
        "no_lost_steps": all(r["lost_steps"] == 0 for r in report["runs"]),
    }
    print(f"goals: {report['goals']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
