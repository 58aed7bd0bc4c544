"""Command line for the cloud backend."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from pathlib import Path

from cloud_backend.server import CloudServer, ServerConfig
from cloud_backend.session import DEFAULT_SESSION_BYTES
from schemas.frames import MAX_FRAME_BYTES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cloud_backend",
        description="Cloud side of split training: runs the tail blocks of each connected device's model, "
        "with feature replay on the device and compressed features/gradients on the wire.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser(
        "serve",
        help="serve devices over WebSockets",
        description="Serve devices over WebSockets (ws:// or, with --tls-cert/--tls-key, wss://).",
    )
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s; use 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8765, help="TCP port (default: %(default)s; 0 picks a free port)")
    auth = s.add_mutually_exclusive_group()
    auth.add_argument(
        "--token",
        default=None,
        help="shared secret devices must present in Hello (default: $SPLITREPLAY_TOKEN, else no auth); "
        "prefer --token-file, since a command line is visible to other users",
    )
    auth.add_argument("--token-file", type=Path, help="read the shared secret from this file (first line)")
    s.add_argument("--tls-cert", help="PEM certificate chain for wss://")
    s.add_argument("--tls-key", help="PEM private key for wss://")
    s.add_argument(
        "--max-sessions",
        type=int,
        default=64,
        help="concurrent device sessions before new ones are refused (default: %(default)s)",
    )
    s.add_argument(
        "--max-unauthenticated",
        type=int,
        default=256,
        help="connections that have not yet had a Hello accepted; counted apart from sessions (default: %(default)s)",
    )
    s.add_argument(
        "--hello-timeout", type=float, default=10.0, help="seconds from connect to an accepted Hello (default: %(default)s)"
    )
    s.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        help="close a session that sends nothing for this many seconds (default: %(default)s)",
    )
    s.add_argument(
        "--session-ttl",
        type=float,
        default=600.0,
        metavar="S",
        help="keep a session whose connection dropped this long for its device to resume (0: end it at once) "
        "(default: %(default)s)",
    )
    s.add_argument(
        "--state-dir",
        metavar="DIR",
        default=None,
        help="checkpoint each session here (tail weights, optimizer, counters, RNG; at points the device asks for) "
        "and keep the resume-token key, so that after a crash or a restart with the same DIR devices resume "
        "their sessions (default: none, sessions die with the process)",
    )
    s.add_argument(
        "--max-session-memory",
        type=int,
        default=DEFAULT_SESSION_BYTES >> 20,
        metavar="MIB",
        help="memory budget of one session in MiB: model, optimizer, reply cache, activations, migrating weights; "
        "a Hello that would exceed it is refused (default: %(default)s)",
    )
    s.add_argument(
        "--max-memory",
        type=int,
        default=None,
        metavar="MIB",
        help="memory all sessions together may hold, in MiB (each session's estimate, as for --max-session-memory); "
        "a Hello that would not fit is refused with SERVER_BUSY while other sessions hold the rest "
        "(default: no shared cap)",
    )
    s.add_argument(
        "--max-frame-bytes",
        type=int,
        default=MAX_FRAME_BYTES,
        help="largest accepted frame (default: %(default)s = 64 MiB)",
    )
    s.add_argument(
        "--context-every", type=int, default=10, help="send a Context report every N train steps (default: %(default)s)"
    )
    s.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads per compute (default: torch's choice, one per core); sessions already compute "
        "in parallel threads, so a server with many devices does better with 1 (bench/load.py, 16 sessions on 2 "
        "cores: 1.2x the steps/s, half the p99 latency)",
    )
    s.add_argument(
        "--cloud-slowdown",
        type=float,
        default=1.0,
        metavar="S",
        help="emulation: make every session's compute take S times longer, as a loaded or smaller cloud would "
        "(default: %(default)s)",
    )
    s.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (sessions, steps, bytes, refusals by error code, "
        "step latency, memory per session); 0 picks a free port (default: no endpoint)",
    )
    s.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line with each session event's fields "
        "(event, session, peer, code, steps...) for a log pipeline (default: %(default)s)",
    )
    s.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also log each session's debug details (sessions' open/refuse/close lines are always logged)",
    )
    return parser


async def serve_forever(config: ServerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    from edge_sdk.optim import warm_up

    warm_up()
    async with CloudServer(config) as server:
        scheme = "wss" if config.tls_cert else "ws"
        # The emulator and scripts parse this line to find a port chosen with --port 0.
        print(f"listening on {scheme}://{config.host}:{server.port}", flush=True)
        if server.metrics_port is not None:
            print(f"metrics on http://{config.host}:{server.metrics_port}/metrics", flush=True)
        await stop.wait()
        print("shutting down", flush=True)


def configure_logging(fmt: str) -> None:
    """Root handler on stderr: text lines, or JSON objects (python-json-logger) that
    carry each session event's fields (the ``extra`` of the server's log calls)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


def read_token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The shared secret from --token, --token-file or $SPLITREPLAY_TOKEN; an empty one is an error."""
    if args.token_file is not None:
        try:
            lines = args.token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"cannot read --token-file {args.token_file}: {getattr(exc, 'strerror', None) or exc}")
        token, source = (lines[0].strip() if lines else ""), f"--token-file {args.token_file}"
    elif args.token is not None:
        token, source = args.token, "--token"
    elif "SPLITREPLAY_TOKEN" in os.environ:
        token, source = os.environ["SPLITREPLAY_TOKEN"], "$SPLITREPLAY_TOKEN"
    else:
        return None
    if not token:
        parser.error(f"{source} is empty; an empty token would mean no authentication (omit it to serve without one)")
    return token


def main(argv: list[str] | None = None) -> int:
    from edge_sdk.quiet import quiet_third_party

    quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    for name in ("max_sessions", "max_frame_bytes", "max_unauthenticated", "hello_timeout", "idle_timeout", "max_session_memory"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_memory is not None and not args.max_memory > 0:
        parser.error("--max-memory must be positive")
    if args.max_memory is not None and args.max_memory < args.max_session_memory:
        parser.error(f"--max-memory ({args.max_memory} MiB) is below --max-session-memory ({args.max_session_memory} MiB)")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be 0..65535, got {args.metrics_port}")
    if not (args.session_ttl >= 0 and math.isfinite(args.session_ttl)):
        parser.error(f"--session-ttl must be >= 0 seconds, got {args.session_ttl}")
    if not (args.cloud_slowdown >= 1.0 and math.isfinite(args.cloud_slowdown)):
        parser.error(f"--cloud-slowdown must be >= 1, got {args.cloud_slowdown}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("TLS needs both --tls-cert and --tls-key")
    token = read_token(parser, args)
    if args.state_dir is not None:
        from cloud_backend.state_dir import StateDir

        try:
            StateDir(args.state_dir)
        except ValueError as exc:
            parser.error(str(exc))
    # one line per session (opened, refused and why, closed) at the default level;
    # -v adds each decision the server's sessions log; libraries stay at warnings
    configure_logging(args.log_format)
    logging.getLogger("cloud_backend").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        token=token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_sessions=args.max_sessions,
        max_unauthenticated=args.max_unauthenticated,
        hello_timeout_s=args.hello_timeout,
        idle_timeout_s=args.idle_timeout,
        session_ttl_s=args.session_ttl,
        state_dir=args.state_dir,
        max_session_bytes=args.max_session_memory << 20,
        max_frame_bytes=args.max_frame_bytes,
        context_every=args.context_every,
        cloud_slowdown=args.cloud_slowdown,
        max_memory_bytes=args.max_memory << 20 if args.max_memory is not None else None,
        metrics_port=args.metrics_port,
    )
    try:
        asyncio.run(serve_forever(config))
    except OSError as exc:
        if str(exc.strerror).startswith("metrics port"):  # `CloudServer.start` says which port
            print(f"error: cannot listen on {exc.strerror}", file=sys.stderr)
        else:
            print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
