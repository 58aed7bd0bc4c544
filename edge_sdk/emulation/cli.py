"""`python -m edge_sdk emulate`: the whole system on one machine.

Starts a real ``cloud_backend serve`` process on a free loopback port, a shaping
TCP proxy in front of it (bandwidth and one-way latency per direction from a named
profile or a trace file), and the device with an emulated slowdown, then trains.
With no flags it trains the digits CNN in about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from edge_sdk.emulation.faults import FaultSchedule, parse_faults
from edge_sdk.train_cli import (
    add_training_arguments,
    config_from_args,
    finish,
    interrupted,
    resume_point,
    stop_signals,
)


class EmulationError(RuntimeError):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edge_sdk import devices
    from edge_sdk.emulation.network import network_choices

    g = p.add_argument_group("emulation")
    g.add_argument(
        "--network",
        default="wifi",
        help=f"link profile: {network_choices()}; a trace is a CSV of time_s,up_mbps,down_mbps,rtt_ms (default: %(default)s)",
    )
    g.add_argument(
        "--device",
        type=devices.parse_device,
        metavar="DEVICE",
        help=f"a named device profile instead of --device-slowdown: {devices.choices_text()} (default: none)",
    )
    g.add_argument("--report", metavar="DIR", help="folder for the JSON report and PNG plots (default: not written)")
    g.add_argument(
        "--faults",
        default="none",
        metavar="SPEC",
        help="faults to see the run survive them: cut@T and stall@T+D (comma-separated), every:S (a cut every S "
        "seconds) or random:N:SEED[:SPAN] (N cuts); seconds since the link came up (default: %(default)s)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for each of edge and cloud; they share this machine (default: %(default)s)",
    )
    # no --token / --tls-ca: emulate starts its own loopback server
    add_training_arguments(p, exclude=("token", "tls_ca"))
    # the demo's device: 4x slower than this machine (a phone-class CPU, see edge_sdk.devices)
    p.set_defaults(device_slowdown=4.0)


@contextlib.contextmanager
def cloud_process(extra_args: list[str] | None = None, timeout_s: float = 60.0) -> Iterator[tuple[subprocess.Popen, int]]:
    """Run ``python -m cloud_backend serve --port 0`` and yield (process, port)."""
    cmd = [sys.executable, "-m", "cloud_backend", "serve", "--host", "127.0.0.1", "--port", "0", *(extra_args or [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The server logs a line per session to stderr: a file, not a pipe nobody reads
    # while training (a full pipe would block the server).
    with tempfile.TemporaryFile(mode="w+") as log_file:
        # its own session: Ctrl-C in the terminal reaches only this process, which
        # stops its run gracefully while the cloud stays up for the last exchange
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env, start_new_session=True)
        try:
            port = _read_port(proc, log_file, timeout_s)
            yield proc, port
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_port(proc: subprocess.Popen, log_file: IO[str], timeout_s: float) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    # readline blocks, but the server prints this line right after binding (or exits).
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            log_file.seek(0)
            err = log_file.read()
            raise EmulationError(f"cloud backend exited before listening (code {proc.wait()}):\n{err.strip()[-2000:]}")
        m = re.search(r"listening on wss?://[^:]+:(\d+)", line)
        if m:
            return int(m.group(1))
    raise EmulationError("cloud backend did not start listening in time")


def resolve_device(args: argparse.Namespace) -> tuple[float, int | None]:
    """(slowdown, memory budget) from ``--device``, else ``--device-slowdown`` and no budget."""
    if args.device:
        from edge_sdk.devices import get_device

        dev = get_device(args.device)
        return float(dev.slowdown), int(dev.memory_budget_bytes)
    return float(args.device_slowdown), None


async def run_through_proxy(
    cfg,
    network_spec: str,
    cloud_port: int,
    progress=None,
    setup=None,
    *,
    on_epoch=None,
    status=None,
    clients=None,
    faults: FaultSchedule | None = None,
    resume_from=None,
) -> object:
    """Train through a shaping proxy in front of the cloud at ``cloud_port``
    (``clients``: a list the client is appended to, for a report if interrupted;
    ``faults``: when the proxy cuts the connection; ``resume_from``: a device
    checkpoint to carry on from)."""
    from edge_sdk.client import EdgeClient
    from edge_sdk.emulation.network import parse_network
    from edge_sdk.emulation.proxy import ProxyThread

    network = parse_network(network_spec)
    client = EdgeClient(
        "ws://127.0.0.1:0",
        cfg,
        progress=progress,
        on_epoch=on_epoch,
        status=status,
        network=network_spec,
        setup=setup,
        shared_clock=True,
        resume_from=resume_from,
    )
    if clients is not None:
        clients.append(client)
    client.prepare()  # profile the device before the link exists
    if network is None and faults is None:
        client.url = f"ws://127.0.0.1:{cloud_port}"
        return await client.run()
    # The link runs on its own thread and loop, so device compute never pauses it.
    with ProxyThread(("127.0.0.1", cloud_port), network, faults=faults) as proxy:
        client.url = f"ws://127.0.0.1:{proxy.port}"
        return await client.run()


def run(args: argparse.Namespace) -> int:
    from edge_sdk.progress import ProgressBar
    from edge_sdk.session import Stopped, TrainingError

    try:
        args.device_slowdown, budget = resolve_device(args)
        cfg = config_from_args(args)
        cfg.memory_budget_bytes = budget  # the decision engine caps K to fit it
        cfg.validate()
        cfg, checkpoint = resume_point(cfg)
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from edge_sdk.emulation.network import parse_network

        parse_network(args.network)  # fail fast on a bad profile name or trace file
        faults = parse_faults(args.faults)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from edge_sdk.training import build_local

    torch.set_num_threads(max(1, args.threads))
    extra = ["--threads", str(max(1, args.threads))] + (["--token", cfg.token] if cfg.token else [])
    if cfg.checkpoint_dir:  # the cloud's half of each checkpoint goes beside the device's
        extra += ["--state-dir", str(Path(cfg.checkpoint_dir) / "cloud")]
    clients: list = []
    stopped = False
    with stop_signals(clients) as caught:
        try:
            with cloud_process(extra) as (_proc, port):
                print(
                    f"cloud backend on 127.0.0.1:{port}; network {args.network}; device slowdown {cfg.device_slowdown:g}x",
                    file=sys.stderr,
                )
                setup = build_local(cfg)
                with ProgressBar(cfg, enabled=args.progress, total=setup.total_steps(cfg)) as bar:
                    run = run_through_proxy(
                        cfg,
                        args.network,
                        port,
                        bar.update,
                        setup,
                        on_epoch=bar.epoch,
                        status=bar.status,
                        clients=clients,
                        faults=faults,
                        resume_from=checkpoint,
                    )
                    result = asyncio.run(run)
        except (TrainingError, EmulationError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, Stopped):
            stopped = True
    if stopped:
        hint = f"python -m edge_sdk emulate --network {args.network} --checkpoint-dir {cfg.checkpoint_dir} --resume"
        return interrupted(clients[0] if clients else None, cfg, args.json_path, caught, resume_hint=hint)
    code = finish(result, clients[0], cfg, args.json_path)
    if code:
        return code
    if args.report:
        from edge_sdk.report import write_report

        paths = write_report(result, Path(args.report))
        print(f"report: {', '.join(str(p) for p in paths)}")
    return 0
