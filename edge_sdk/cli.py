"""Sub-command dispatcher for ``python -m edge_sdk``.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together, importing lazily so that
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("edge_sdk.train_cli", "train a split model against a running cloud backend"),
    "emulate": ("edge_sdk.emulation.cli", "run a full edge-cloud training demo on this machine (real server, shaped link)"),
    "profile": ("edge_sdk.profile", "measure per-block compute, memory and cut sizes of a zoo model"),
    "evaluate": ("edge_sdk.evaluate_cli", "test accuracy of a model a run saved with --save-model"),
    "privacy": (
        "edge_sdk.privacy.cli",
        "measure how much each cut's features reveal to an inversion attack, with and without defences",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edge_sdk",
        description="Device side of split training: the edge head runs here, the cloud tail runs on a cloud_backend server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a sub-command not built into this install
            if not exc.name or not module_name.startswith(exc.name):
                raise
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from edge_sdk.quiet import quiet_third_party

    quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args._run(args) or 0)
