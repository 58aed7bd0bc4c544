"""Command lines: --help explains, bad input is a clear message, signals stop cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from edge_sdk.emulation.cli import cloud_process


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["-m", "edge_sdk", "--help"], "emulate"),
        (["-m", "edge_sdk", "train", "--help"], "--staleness"),
        (["-m", "edge_sdk", "emulate", "--help"], "--network"),
        (["-m", "cloud_backend", "serve", "--help"], "--max-frame-bytes"),
    ],
)
def test_help_explains(argv, expect):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and expect in proc.stdout


def test_serve_stops_cleanly_on_sigterm_and_sigint():
    for sig in (signal.SIGTERM, signal.SIGINT):
        with cloud_process() as (proc, _port):
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0
            assert "shutting down" in out


def test_serve_rejects_bad_settings_without_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "cloud_backend", "serve", "--tls-cert", "x.pem"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--tls-key" in proc.stderr and "Traceback" not in proc.stderr


def test_train_with_a_bad_model_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "edge_sdk", "train", "--server", "ws://127.0.0.1:9", "--model", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "nope" in proc.stderr and "Traceback" not in proc.stderr
