"""Command line for the cloud backend."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from cloud_backend.server import DEFAULT_MAX_FRAME_BYTES, CloudServer, ServerConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cloud_backend",
        description="Cloud side of split training: runs the tail blocks of each connected device's model, "
        "with feature replay on the device and compressed features/gradients on the wire.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", help="serve devices over WebSockets", description="Serve devices over WebSockets (ws:// or, with --tls-cert/--tls-key, wss://).")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s; use 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8765, help="TCP port (default: %(default)s; 0 picks a free port)")
    s.add_argument("--token", default=os.environ.get("SPLITREPLAY_TOKEN"), help="shared secret devices must present in Hello (default: $SPLITREPLAY_TOKEN, else no auth)")
    s.add_argument("--tls-cert", help="PEM certificate chain for wss://")
    s.add_argument("--tls-key", help="PEM private key for wss://")
    s.add_argument("--max-sessions", type=int, default=64, help="concurrent device sessions before new ones are refused (default: %(default)s)")
    s.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES, help="largest accepted frame (default: %(default)s = 64 MiB)")
    s.add_argument("--context-every", type=int, default=10, help="send a Context report every N train steps (default: %(default)s)")
    s.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    s.add_argument("-v", "--verbose", action="store_true", help="log every session open/close")
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
        await stop.wait()
        print("shutting down", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    for name in ("max_sessions", "max_frame_bytes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("TLS needs both --tls-cert and --tls-key")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        token=args.token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_sessions=args.max_sessions,
        max_frame_bytes=args.max_frame_bytes,
        context_every=args.context_every,
    )
    try:
        asyncio.run(serve_forever(config))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
