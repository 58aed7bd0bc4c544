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


def test_summary_shows_the_decision_timeline_and_the_cost_of_training_alone():
    from edge_sdk.train_cli import summary_table
    from edge_sdk.training import TrainResult

    result = TrainResult(point=5, num_blocks=5, steps=100, train_s=10.0, wall_s=12.0, test_accuracy=0.9)
    result.partition_history = [
        {"step": 0, "point": 2, "codec": "int8", "staleness": 2, "switch": False, "reason": "initial choice p=2"},
        {"step": 60, "point": 5, "codec": "fp32", "staleness": 0, "switch": True, "reason": "switching p=2 int8 K=2 -> p=5"},
    ]
    result.steps_by_choice = {"p=2 int8 K=2": 60, "p=5 fp32 K=0": 40}
    result.device_only_estimate = {"step_ms": 50.0, "train_s": 5.0, "measured": True}
    text = summary_table(result)
    assert "5 (device-only: every block on the device)" in text
    assert "1 (1 after step 50)" in text
    assert "p=2 int8 K=2 60 %, device-only 40 %" in text
    assert "step 60: switching p=2 int8 K=2 -> p=5" in text
    assert (
        "50.0 ms/step (measured step), 5.0 s for these steps vs 10.0 s here: training alone would have been 2.0x faster" in text
    )
