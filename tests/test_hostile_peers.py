"""Hostile or buggy peers against a live server: each defect a live attack found.

Every test talks to a real `CloudServer` over loopback sockets (or, where the
server's memory is measured, a real ``python -m cloud_backend serve`` process).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cloud_backend import session as session_mod
from cloud_backend.cli import main as serve_main
from cloud_backend.server import CloudServer, ServerConfig
from edge_sdk.client import EdgeClient
from edge_sdk.emulation.cli import cloud_process
from edge_sdk.training import TrainConfig
from schemas import codecs
from schemas import frames as fr
from schemas.errors import ErrorCode
from schemas.transport import clear_text_token_warning, is_loopback

QUICK = dict(epochs=1, max_steps_per_epoch=6, batch_size=8, point=2, codec="int8", staleness=1)
BATCH = 8


def raw(frame) -> bytes:
    return fr.encode(fr.Envelope(frame=frame))


async def open_raw(port: int):
    return await connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None, max_size=None)


async def recv_frame(ws, timeout: float = 30.0):
    return fr.decode(await asyncio.wait_for(ws.recv(), timeout)).frame


async def hello(ws, spec, hello_frame, **over) -> fr.HelloAck:
    await ws.send(raw(hello_frame(spec, **over)))
    ack = await recv_frame(ws)
    assert isinstance(ack, fr.HelloAck), ack
    return ack


def features(spec, step: int, *, labels=None, grad_codec="fp32", point=2) -> fr.Features:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        f = spec.model.head(point)(torch.randn(BATCH, 1, 8, 8, generator=g))
    tf, _ = codecs.encode_tensor(f, codecs.Codec.NONE)
    y = torch.randint(0, 10, (BATCH,), generator=g) if labels is None else labels
    return fr.Features(
        step=step, epoch=0, point=point, tensor=tf, labels=codecs.tensor_frame_from_tensor(y), train=True, grad_codec=grad_codec
    )


async def honest_run(port: int, **over) -> int:
    client = EdgeClient(f"ws://127.0.0.1:{port}", TrainConfig(**{**QUICK, **over}))
    return (await asyncio.wait_for(client.run(), timeout=120)).steps


async def closed_by_server(ws, timeout: float) -> None:
    """Read until the server closes the connection (fails after ``timeout``)."""

    async def drain():
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            return

    await asyncio.wait_for(drain(), timeout)


# ------------------------------------------------------------ 1. dead sessions
async def test_a_bad_label_is_refused_and_the_slot_is_free_again(digits_spec, hello_frame):
    async with CloudServer(ServerConfig(port=0, max_sessions=1)) as server:
        async with await open_raw(server.port) as ws:
            await hello(ws, digits_spec, hello_frame)
            await ws.send(raw(features(digits_spec, 0, labels=torch.full((BATCH,), 10))))
            err = await recv_frame(ws)
            assert isinstance(err, fr.Error) and err.code == ErrorCode.BAD_TENSOR and "[0, 10)" in err.message
            await ws.send(raw(features(digits_spec, 0)))  # the session still answers
            assert isinstance(await recv_frame(ws), fr.Gradients)
        assert await honest_run(server.port) == 6  # the only slot was released
        await server.wait_idle(10)


async def test_an_internal_error_is_answered_closes_the_session_and_frees_its_slot(digits_spec, hello_frame, monkeypatch):
    async with CloudServer(ServerConfig(port=0, max_sessions=1)) as server:

        def broken(self, frame, recv_ns):
            raise ZeroDivisionError("bug")

        monkeypatch.setattr(session_mod.CloudSession, "_on_train", broken)
        async with await open_raw(server.port) as ws:
            await hello(ws, digits_spec, hello_frame)
            await ws.send(raw(features(digits_spec, 0)))
            err = await recv_frame(ws)
            assert err.code == ErrorCode.INTERNAL and "bug" not in err.message
            await closed_by_server(ws, 10)
            assert ws.close_code == 1011
        monkeypatch.undo()
        assert await honest_run(server.port) == 6
        await server.wait_idle(10)


# ------------------------------------------------------- 2. pre-auth limits
async def test_idle_connections_without_hello_do_not_block_an_authenticated_device():
    cfg = ServerConfig(port=0, token="s3cret", max_sessions=2, hello_timeout_s=1.5)
    async with CloudServer(cfg) as server:
        idle = [await open_raw(server.port) for _ in range(3 * cfg.max_sessions)]
        assert await honest_run(server.port, token="s3cret") == 6
        for ws in idle:  # and each idle connection is told why, then closed
            err = await recv_frame(ws, timeout=10)
            assert err.code == ErrorCode.PROTOCOL and "no Hello within" in err.message
            await closed_by_server(ws, 10)
        await server.wait_idle(10)


async def test_wrong_tokens_never_take_a_slot(digits_spec, hello_frame):
    async with CloudServer(ServerConfig(port=0, token="s3cret", max_sessions=1)) as server:
        for _ in range(4):
            async with await open_raw(server.port) as ws:
                await ws.send(raw(hello_frame(digits_spec, token="guess")))
                err = await recv_frame(ws)
                assert err.code == ErrorCode.UNAUTHORIZED
                await closed_by_server(ws, 10)
        assert server.stats.sessions_total == 0
        assert await honest_run(server.port, token="s3cret") == 6


async def test_unauthenticated_connections_are_capped_apart_from_sessions(digits_spec, hello_frame):
    async with CloudServer(ServerConfig(port=0, max_unauthenticated=2, max_sessions=4)) as server:
        waiting = [await open_raw(server.port) for _ in range(2)]
        async with await open_raw(server.port) as third:
            err = await recv_frame(third)
            assert err.code == ErrorCode.SERVER_BUSY and "waiting to say Hello" in err.message
        # once one of them says Hello it is a session, and a new connection is admitted again
        await hello(waiting[0], digits_spec, hello_frame)
        assert await honest_run(server.port) == 6
        for ws in waiting:
            await ws.close()


async def test_large_frames_before_hello_are_refused(digits_spec):
    async with CloudServer(ServerConfig(port=0, max_hello_bytes=4096)) as server, await open_raw(server.port) as ws:
        await ws.send(b"\0" * 100_000)
        await closed_by_server(ws, 10)
        assert ws.close_code == 1009  # message too big


async def test_a_frame_trickled_byte_by_byte_is_cut_off(digits_spec, hello_frame):
    cfg = ServerConfig(port=0, ping_interval_s=0.3, ping_timeout_s=0.3)
    async with CloudServer(cfg) as server:
        ws = await open_raw(server.port)
        await hello(ws, digits_spec, hello_frame)
        transport = ws.transport
        # a masked binary frame header announcing 4096 bytes, then one byte at a time
        transport.write(bytes([0x82, 0xFE, 0x10, 0x00, 1, 2, 3, 4]))
        t0 = time.monotonic()
        for _ in range(100):  # at most 20 s of trickling
            if transport.is_closing() or ws.protocol.state.name == "CLOSED":
                break
            transport.write(b"\x00")
            await asyncio.sleep(0.2)  # the attacker's pace, not synchronization
        await closed_by_server(ws, 10)
        assert time.monotonic() - t0 < 10
        await server.wait_idle(10)


async def test_an_authenticated_session_that_stops_talking_is_closed(digits_spec, hello_frame):
    async with CloudServer(ServerConfig(port=0, idle_timeout_s=1.0)) as server:
        async with await open_raw(server.port) as ws:
            await hello(ws, digits_spec, hello_frame)
            err = await recv_frame(ws, timeout=10)
            assert err.code == ErrorCode.PROTOCOL and "no frame for 1 s" in err.message
            await closed_by_server(ws, 10)
        await server.wait_idle(10)
        assert len(server.stats.closed) == 1


# ------------------------------------------------- 3./4./5. floods and bombs
def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to read the server's memory")
def test_a_flooding_client_leaves_server_memory_bounded(digits_spec, hello_frame):
    """Features sent as fast as possible, replies never read: the server stops reading
    (TCP pushes back) instead of queueing; RSS stays within 150 MiB of where it began."""
    template = features(digits_spec, 0, point=1)  # 32 KiB of fp32 features per frame
    sent = 0

    async def flood(port: int) -> None:
        nonlocal sent
        ws = await connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None, max_size=None, max_queue=1)
        await ws.send(raw(hello_frame(digits_spec, point=1)))
        for step in range(20_000):  # 640 MiB if nothing pushed back
            data = raw(dataclasses.replace(template, step=step))
            try:
                await asyncio.wait_for(ws.send(data), 3.0)
            except TimeoutError:
                break  # the server stopped reading: backpressure reached the sender
            sent += 1
        ws.transport.abort()

    with cloud_process(["--threads", "1"]) as (proc, port):
        asyncio.run(honest_run(port))  # warm up: torch loaded, one session served
        before = _rss_bytes(proc.pid)
        asyncio.run(flood(port))
        peak = _rss_bytes(proc.pid)
        assert asyncio.run(honest_run(port)) == 6  # still serves devices
        after = _rss_bytes(proc.pid)
        t0 = time.monotonic()
        proc.terminate()
        proc.wait(timeout=30)
        shutdown_s = time.monotonic() - t0
    print(
        f"flood: {sent} frames sent before backpressure; RSS before {before >> 20} MiB, peak {peak >> 20}, "
        f"after {after >> 20}; shutdown {shutdown_s:.2f} s"
    )  # shown with pytest -s
    assert sent < 20_000, "the flood was never pushed back"
    assert peak - before < 150 << 20 and after - before < 150 << 20, (before, peak, after)
    assert shutdown_s < 10


async def test_a_top_k_weights_bomb_is_refused_before_allocation(digits_spec, hello_frame, topk_bomb):
    async with CloudServer(ServerConfig(port=0)) as server, await open_raw(server.port) as ws:
        ack = await hello(ws, digits_spec, hello_frame)
        bomb = topk_bomb(1 << 26)
        name = next(n for n, _ in digits_spec.model.named_parameters() if n.startswith("blocks.0."))
        frame = raw(fr.Weights(step=0, name=name, kind="param", tensor=bomb))
        assert len(frame) < 400
        for _ in range(50):
            await ws.send(frame)
        errs = [await recv_frame(ws) for _ in range(50)]
        assert all(e.code == ErrorCode.BAD_TENSOR for e in errs)
        assert server.stats.sessions[ack.session]._incoming is None


async def test_a_refused_step_leaves_the_weights_bit_identical(digits_spec, hello_frame):
    async with CloudServer(ServerConfig(port=0)) as server, await open_raw(server.port) as ws:
        ack = await hello(ws, digits_spec, hello_frame)
        session = server.stats.sessions[ack.session]
        await ws.send(raw(features(digits_spec, 0)))
        assert isinstance(await recv_frame(ws), fr.Gradients)
        before = [t.clone() for b in session.blocks for t in b.state_dict().values()]
        for bad in (features(digits_spec, 1, grad_codec="bogus"), features(digits_spec, 1, labels=torch.full((BATCH,), -3))):
            for _ in range(2):
                await ws.send(raw(bad))
                assert isinstance(await recv_frame(ws), fr.Error)
        after = [t.clone() for b in session.blocks for t in b.state_dict().values()]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert session.applied_steps == 1


# ------------------------------------------------------------------- 6. auth
def test_an_empty_token_is_an_error_not_no_auth(tmp_path, capsys):
    with pytest.raises(ValueError, match="empty token"):
        ServerConfig(token="")
    with pytest.raises(SystemExit):
        serve_main(["serve", "--token", ""])
    assert "empty" in capsys.readouterr().err
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(SystemExit):
        serve_main(["serve", "--token-file", str(empty)])
    err = capsys.readouterr().err
    assert "--token-file" in err and "empty" in err
    with pytest.raises(SystemExit):
        serve_main(["serve", "--token-file", str(tmp_path / "missing")])
    assert "cannot read" in capsys.readouterr().err


def test_token_file_protects_a_real_server(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-a-file\n")
    with cloud_process(["--token-file", str(secret)]) as (_, port):
        assert asyncio.run(honest_run(port, token="from-a-file")) == 6
        with pytest.raises(Exception, match="token"):
            asyncio.run(honest_run(port, token="wrong"))


def test_tokens_in_clear_off_loopback_are_warned_about():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("10.0.0.5") and not is_loopback("cloud.example.org")
    assert clear_text_token_warning("ws://127.0.0.1:8765") is None
    assert clear_text_token_warning("wss://cloud.example.org") is None
    assert "in clear" in clear_text_token_warning("ws://cloud.example.org:8765")
    assert ServerConfig(host="0.0.0.0", token="t").token_in_clear
    assert not ServerConfig(host="127.0.0.1", token="t").token_in_clear
    assert not ServerConfig(host="0.0.0.0", token="t", tls_cert="c", tls_key="k").token_in_clear


def test_serve_warns_when_the_token_would_cross_the_network_in_clear():
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_backend", "serve", "--host", "0.0.0.0", "--port", "0", "--token", "t"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "listening on" in proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "in clear" in err


async def test_keepalive_forgives_pongs_held_up_by_the_servers_own_backpressure(digits_spec, hello_frame, monkeypatch):
    """The server stops reading while a session's inbox is full; a pong queued behind
    those frames must not get an honest, pipelining device disconnected."""
    real = session_mod.CloudSession._on_train

    def slow(self, frame, recv_ns):
        time.sleep(0.1)  # stands in for a slow tail step (a big model on a busy server)
        return real(self, frame, recv_ns)

    monkeypatch.setattr(session_mod.CloudSession, "_on_train", slow)
    async with CloudServer(ServerConfig(port=0, ping_interval_s=0.2, ping_timeout_s=0.2, inbox_frames=2)) as server:
        async with await open_raw(server.port) as ws:
            await hello(ws, digits_spec, hello_frame)
            for step in range(30):  # about 3 s of queued work, far beyond the 0.2 s pong timeout
                await ws.send(raw(features(digits_spec, step)))
            got = [await recv_frame(ws) for _ in range(33)]  # 30 gradients and 3 context reports
            assert sum(isinstance(f, fr.Gradients) for f in got) == 30


async def test_fragmented_messages_end_the_connection(digits_spec, hello_frame, cloud_server):
    server = cloud_server
    async with await open_raw(server.port) as ws:
        await hello(ws, digits_spec, hello_frame)
        await ws.send(iter([b"\x00", b"\x01"]))  # one message in two fragments
        await closed_by_server(ws, 10)
        assert ws.close_code == 1008
    await server.wait_idle(10)
