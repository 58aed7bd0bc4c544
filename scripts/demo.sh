#!/usr/bin/env bash
# The main job: emulated edge-cloud training of the digits CNN (bundled data), a real
# cloud backend process, a shaped WiFi link and a device 4x slower than this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m edge_sdk emulate --json runs/demo/run.json --report runs/demo "$@"
