#!/usr/bin/env bash
# The main job: emulated edge-cloud training of the digits CNN (bundled data), a real
# cloud backend process, a shaped WiFi link and a Raspberry-Pi-class device (8x slower
# than this machine, where splitting pays; the engine may pick any cut, or training alone).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m edge_sdk emulate --device pi4 --json runs/demo/run.json --report runs/demo "$@"
