"""Whole runs over real sockets on loopback: server, shaping proxy, client."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect

from cloud_backend.server import CloudServer, ServerConfig
from edge_sdk.client import EdgeClient
from edge_sdk.emulation.cli import cloud_process
from edge_sdk.emulation.network import parse_network
from edge_sdk.emulation.proxy import ShapingProxy
from edge_sdk.session import TrainingError
from edge_sdk.training import TrainConfig
from schemas import frames as fr
from schemas.errors import ErrorCode

QUICK = dict(epochs=1, max_steps_per_epoch=12, batch_size=32)


async def test_run_through_shaping_proxy_counts_every_step_once(cloud_server):
    server = cloud_server
    async with ShapingProxy(target=("127.0.0.1", server.port), network=parse_network("wifi")) as proxy:
        cfg = TrainConfig(**QUICK, point=2, staleness=3, codec="int8")
        client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg, shared_clock=True)
        result = await asyncio.wait_for(client.run(), timeout=120)
    await server.wait_idle(10)  # the server notes the session's end right after Bye
    assert result.steps == 12
    (closed,) = server.stats.closed
    assert closed["steps"] == 12 and closed["last_step"] == 11
    assert result.bytes_up >= proxy.stats().bytes_up - 4096  # websocket framing only
    assert 0.0 <= result.test_accuracy <= 1.0 and result.history
    assert result.stage_ms["up"] > 0 and result.stage_ms["down"] > 0


async def test_several_sessions_are_isolated_and_a_hostile_frame_does_not_hurt_them(cloud_server):
    server = cloud_server
    url = f"ws://127.0.0.1:{server.port}"
    async with connect(url, compression=None) as ws:
        await ws.send(b"\x00garbage frame" * 10)
        err = fr.decode(await ws.recv()).frame
        assert isinstance(err, fr.Error) and err.code != ErrorCode.INTERNAL
        await ws.send("text is not a frame")
        err2 = fr.decode(await ws.recv()).frame
        assert isinstance(err2, fr.Error) and err2.code == ErrorCode.MALFORMED
        # the hostile session is still open, and two honest sessions train in parallel
        a = EdgeClient(url, TrainConfig(**QUICK, staleness=2, seed=1))
        b = EdgeClient(url, TrainConfig(**QUICK, staleness=0, seed=2, codec="fp16"))
        ra, rb = await asyncio.wait_for(asyncio.gather(a.run(), b.run()), timeout=120)
    assert ra.steps == rb.steps == 12


async def test_wrong_token_is_refused_with_a_clear_message(caplog):
    caplog.set_level(logging.INFO, logger="cloud_backend")  # the level `serve` logs at by default
    async with CloudServer(ServerConfig(port=0, token="s3cret")) as server:
        client = EdgeClient(f"ws://127.0.0.1:{server.port}", TrainConfig(**QUICK, token="guess"))
        with pytest.raises(TrainingError, match="token"):
            await asyncio.wait_for(client.run(), timeout=30)
        ok = EdgeClient(f"ws://127.0.0.1:{server.port}", TrainConfig(**QUICK, token="s3cret"))
        assert (await asyncio.wait_for(ok.run(), timeout=120)).steps == 12
    # one line per connection: refused and why, opened, closed with the steps applied
    lines = [r.getMessage() for r in caplog.records if r.name == "cloud_backend"]
    assert any(re.fullmatch(r"connection 1 from 127\.0\.0\.1:\d+ refused: .*token.* \(UNAUTHORIZED\)", m) for m in lines), lines
    assert any(re.fullmatch(r"session 2 opened from 127\.0\.0\.1:\d+: .*", m) for m in lines), lines
    assert "session 2 closed after 12 train steps" in lines


def test_killing_the_cloud_mid_run_ends_the_edge_with_a_clear_message():
    # the device re-dials for 2 s (backoff), finds nobody, and says both why and that it gave up
    cfg = TrainConfig(epochs=2, batch_size=16, staleness=2, reconnect_timeout_s=2.0)
    with cloud_process(["--threads", "1"]) as (proc, port):

        def kill_after_a_few_steps(ev):
            if ev.step == 5:
                proc.kill()

        client = EdgeClient(f"ws://127.0.0.1:{port}", cfg, progress=kill_after_a_few_steps)

        async def run():
            return await asyncio.wait_for(client.run(), timeout=60)

        with pytest.raises(TrainingError, match=r"(lost|closed).*gave up reconnecting: no connection within 2 s"):
            asyncio.run(run())
    assert client.session.pipeline.steps_applied < 60


def test_unreachable_cloud_is_a_clear_error():
    client = EdgeClient("ws://127.0.0.1:9", TrainConfig(**QUICK))
    with pytest.raises(TrainingError, match="cannot connect"):
        asyncio.run(client.run())


def test_emulate_command_writes_the_report(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_sdk",
            "emulate",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "15",
            "--network",
            "4g",
            "--device-slowdown",
            "2",
            "--point",
            "2",  # a split (the engine would train this small model alone on 4g)
            "--json",
            str(out),
            "--report",
            str(tmp_path / "rep"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    for key in (
        "test_accuracy",
        "train_loss",
        "steps",
        "epochs",
        "wall_s",
        "bytes_up",
        "bytes_down",
        "stage_ms",
        "point",
        "codec",
        "staleness",
        "network",
        "device_slowdown",
        "steps_by_choice",
    ):
        assert key in data, key
    assert data["steps"] == 15 and data["network"] == "4g" and data["device_slowdown"] == 2
    assert set(data["stage_ms"]) >= {"edge", "up", "cloud", "down"}
    assert (tmp_path / "rep" / "training.png").stat().st_size > 10_000
    assert "test accuracy" in proc.stdout
    # --no-progress: one line per epoch for log files, and nothing from third parties
    assert "epoch 1/1: train loss" in proc.stderr and "test acc" in proc.stderr
    for noise in ("Traceback", "Failed to load", "triton", "Warning"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


def test_emulate_rejects_bad_flags_without_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "edge_sdk", "emulate", "--network", "carrier-pigeon"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "carrier-pigeon" in proc.stderr


async def test_tls_with_a_self_signed_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(  # noqa: ASYNC221 - set-up before the loop does any work
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    async with CloudServer(ServerConfig(port=0, tls_cert=str(cert), tls_key=str(key))) as server:
        url = f"wss://127.0.0.1:{server.port}"
        untrusted = EdgeClient(url, TrainConfig(**QUICK))
        with pytest.raises(TrainingError, match="cannot connect"):
            await asyncio.wait_for(untrusted.run(), timeout=30)
        trusted = EdgeClient(url, TrainConfig(**QUICK, tls_ca=str(cert)))
        assert (await asyncio.wait_for(trusted.run(), timeout=120)).steps == 12
