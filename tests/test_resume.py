"""Surviving a dropped link: the device re-dials, re-attaches to its session with
the resume token, re-sends what is still in its window, and every step is applied
exactly once on both sides (issue: training survives the network)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from cloud_backend.session import CloudSession
from edge_sdk.client import EdgeClient, backoff_delays
from edge_sdk.emulation.inprocess import InProcessLink
from edge_sdk.emulation.network import PROFILES
from edge_sdk.emulation.proxy import ShapingProxy
from edge_sdk.session import EdgeSession, TrainingError
from edge_sdk.training import TrainConfig, build_local
from schemas import frames as fr

EXACT = dict(point=2, codec="fp32", grad_codec="fp32", staleness=0, batch_size=16, epochs=2, max_steps_per_epoch=12)


def _run(cuts: dict[int, str] | None = None, **over):
    cfg = TrainConfig(**{**EXACT, **over})
    torch.manual_seed(3)
    edge, cloud = EdgeSession(cfg, build_local(cfg)), CloudSession(1)
    link = InProcessLink(edge, cloud, cuts=cuts)
    result = link.drive(edge.run(0.0))
    return edge, cloud, link, result


def _merged(edge: EdgeSession, cloud: CloudSession) -> dict[str, torch.Tensor]:
    head = edge.setup.spec.model.state_dict()
    assert cloud.spec is not None
    tail = cloud.spec.model.state_dict()
    p = edge.pipeline.point
    return {k: (head[k] if int(k.split(".")[1]) < p else tail[k]) for k in head}


def test_a_resumed_run_is_the_uninterrupted_run():
    """K=0 fp32, fixed seed: cuts that lose a request, cuts that lose the cloud's
    answer (so the step was applied and must not be applied again), during training,
    link probes and evaluation: the final weights equal an uninterrupted run's."""
    edge0, cloud0, link0, plain = _run()
    sends = link0.sends
    cuts = {5: "request", 9: "reply", 14: "reply", 20: "request", 27: "reply", sends - 12: "request", sends - 4: "reply"}
    edge, cloud, link, resumed = _run(cuts)
    assert link.reconnects >= len(edge.reconnects) >= len(cuts) - 1  # a cut may fall on a frame sent while down
    assert not link.cuts  # every cut happened
    a, b = _merged(edge0, cloud0), _merged(edge, cloud)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=k)
    # exact step accounting: 24 steps, each applied once on each side
    assert resumed.steps == plain.steps == 24 == edge.pipeline.steps_applied == cloud.applied_steps
    assert cloud.last_step == 23
    assert [h["test_accuracy"] for h in resumed.history] == [h["test_accuracy"] for h in plain.history]
    assert resumed.reconnects and all(r["outage_s"] >= 0 for r in resumed.reconnects)


def test_with_steps_in_flight_every_step_is_applied_exactly_once():
    """K=3, int8: a cut can lose up to four steps' features or gradients at once."""
    _, _, link0, _ = _run(staleness=3, codec="int8")
    rng = random.Random(7)
    cuts = {n: rng.choice(["request", "reply"]) for n in sorted(rng.sample(range(4, link0.sends - 2), 10))}
    edge, cloud, link, result = _run(cuts, staleness=3, codec="int8")
    # a cut can also hit a resume's own Hello: then it dials again within one resume
    assert not link.cuts and link.reconnects >= len(edge.reconnects) > 0
    assert result.steps == 24 == edge.pipeline.steps_applied == cloud.applied_steps
    assert edge.pipeline.next_step == 24 and cloud.last_step == 23
    resent = sum(r["resent"] for r in edge.reconnects)
    assert resent > 0  # some cut caught steps in flight; none was applied twice (counts above)


def test_without_a_reconnect_budget_a_drop_ends_the_run():
    with pytest.raises(TrainingError, match="the link was cut"):
        _run({6: "request"}, reconnect_timeout_s=0)


def test_a_resume_with_a_wrong_token_is_refused():
    cfg = TrainConfig(**EXACT)
    edge, cloud = EdgeSession(cfg, build_local(cfg)), CloudSession(1)
    link = InProcessLink(edge, cloud, cuts={4: "request"})
    link.drive(edge.handshake())
    edge._resumable = True
    edge.resume_token = "0" * 64  # not the one the cloud handed out
    with pytest.raises(TrainingError, match="refused to resume: wrong resume token"):
        link.drive(edge.probe_rtt(6))


def test_backoff_grows_exponentially_with_full_jitter_up_to_a_cap():
    delays = [d for d, _ in zip(backoff_delays(random.Random(1), base_s=0.25, cap_s=8.0), range(12))]
    for n, d in enumerate(delays):
        assert 0.0 <= d <= min(8.0, 0.25 * 2**n)
    assert max(delays[:3]) <= 1.0 and max(delays[6:]) > 1.0  # it waits longer as attempts fail
    assert len(set(delays)) == len(delays)  # jittered: no two devices in lock-step


# ------------------------------------------------------------------ over TCP
@pytest.mark.slow
async def test_twenty_connection_cuts_through_the_proxy_lose_and_duplicate_nothing(cloud_server):
    server = cloud_server
    cfg = TrainConfig(epochs=2, max_steps_per_epoch=60, batch_size=16, point=2, codec="int8", staleness=2)
    async with ShapingProxy(target=("127.0.0.1", server.port), network=PROFILES["wifi"]) as proxy:
        cut_at = set(range(5, 120, 6))  # 20 cuts while training, some during evaluation
        assert len(cut_at) == 20

        def on_step(ev):
            if ev.step in cut_at:
                cut_at.discard(ev.step)
                proxy.cut()

        client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg, progress=on_step)
        result = await asyncio.wait_for(client.run(), timeout=300)
    assert not cut_at
    assert len(result.reconnects) >= 20
    assert result.steps == 120 == client.session.pipeline.steps_applied
    (closed,) = server.stats.closed
    assert closed["steps"] == 120 and closed["last_step"] == 119  # each step applied once by the cloud
    assert server.stats.sessions_total == 1 and server.stats.sessions_detached == 0
    assert 0.0 < result.test_accuracy <= 1.0


async def test_a_session_without_its_device_expires_after_its_ttl():
    from cloud_backend.server import CloudServer, ServerConfig

    async with CloudServer(ServerConfig(port=0, session_ttl_s=0.5)) as server:
        async with ShapingProxy(target=("127.0.0.1", server.port)) as proxy:

            def die(ev):
                if ev.step == 3:
                    proxy.cut()
                    raise KeyboardInterrupt  # the device goes away for good

            client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", TrainConfig(**{**EXACT, "staleness": 2}), progress=die)
            with pytest.raises(KeyboardInterrupt):
                await client.run()
            await server.wait_idle(10)  # no connection left
            assert server.stats.sessions_detached == 1 and len(server.stats.sessions) == 1
            expired = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(2.0, expired.set_result, None)
            await expired  # the TTL (0.5 s) passes
        assert server.stats.sessions_detached == 0 and not server.stats.sessions
        (closed,) = server.stats.closed
        assert closed["steps"] >= 3


async def test_a_resume_takes_over_a_half_open_connection_and_a_wrong_token_cannot(cloud_server, digits_spec, hello_frame):
    """The device saw the drop, the server did not yet (its TCP side is still open):
    a resume with the right token takes the session over at once; a wrong one is
    refused and leaves the live connection alone."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async def dial():
        return await connect(f"ws://127.0.0.1:{cloud_server.port}", compression=None, ping_interval=None, max_size=None)

    async def say(ws, frame):
        await ws.send(fr.encode(fr.Envelope(frame=frame)))
        return fr.decode(await asyncio.wait_for(ws.recv(), 30)).frame

    old = await dial()
    ack = await say(old, hello_frame(digits_spec))
    assert isinstance(ack, fr.HelloAck) and len(ack.resume_token) == 64 and not ack.resumed
    intruder = await dial()
    refused = await say(intruder, hello_frame(digits_spec, resume_session=ack.session, resume_token="f" * 64))
    assert isinstance(refused, fr.Error) and "wrong resume token" in refused.message
    assert cloud_server.stats.sessions_active == 1  # the live session is untouched
    new = await dial()
    back = await say(new, hello_frame(digits_spec, resume_session=ack.session, resume_token=ack.resume_token))
    assert isinstance(back, fr.HelloAck) and back.resumed and back.session == ack.session and back.last_step == -1
    with pytest.raises(ConnectionClosed):  # the half-open connection was dropped
        await asyncio.wait_for(old.recv(), 10)
    assert cloud_server.stats.sessions_active == 1 and cloud_server.stats.sessions_detached == 0
    await new.send(fr.encode(fr.Envelope(frame=fr.Bye(reason="done"))))
    await new.close()
    await intruder.close()
    await cloud_server.wait_idle(10)
    assert len(cloud_server.stats.closed) == 1


def test_save_model_brings_the_whole_trained_model_to_the_device():
    """--save-model: after the last epoch the tail and its optimizer state come down
    (a repartition to device-only); the device then holds exactly the split-trained model."""
    edge0, cloud0, _, plain = _run()
    edge, cloud, _, saved = _run(save_model="unused.safetensors")  # the session only collects; the CLI writes
    L = edge.setup.spec.model.num_blocks
    assert edge.pipeline.point == L and cloud.blocks == []
    assert (saved.point, saved.codec, saved.staleness) == (plain.point, plain.codec, plain.staleness)  # what trained
    expect, got = _merged(edge0, cloud0), edge.setup.spec.model.state_dict()
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=0, atol=0, msg=k)


async def test_only_a_goodbye_ends_a_session_a_lost_or_odd_close_keeps_it(cloud_server, digits_spec, hello_frame):
    """A normal close the device starts (1000) is a goodbye: freed. Any other end
    (no close frame, or a close for another reason, e.g. a keepalive that gave up
    on a slow link) keeps the session for a resume."""
    from websockets.asyncio.client import connect

    async def session_then(end):
        ws = await connect(f"ws://127.0.0.1:{cloud_server.port}", compression=None, ping_interval=None, max_size=None)
        await ws.send(fr.encode(fr.Envelope(frame=hello_frame(digits_spec))))
        assert isinstance(fr.decode(await ws.recv()).frame, fr.HelloAck)
        await end(ws)
        await cloud_server.wait_idle(10)

    await session_then(lambda ws: ws.close())  # 1000, started by the device
    assert cloud_server.stats.sessions_detached == 0 and len(cloud_server.stats.closed) == 1
    await session_then(lambda ws: ws.close(code=1011, reason="keepalive ping timeout"))
    assert cloud_server.stats.sessions_detached == 1

    async def vanish(ws):
        ws.transport.abort()

    await session_then(vanish)
    assert cloud_server.stats.sessions_detached == 2 and len(cloud_server.stats.closed) == 1


def test_fault_specs_parse_or_say_what_is_accepted():
    from edge_sdk.emulation.faults import FaultSchedule, parse_faults

    assert parse_faults("none") is None
    assert parse_faults("cut@12,cut@3.5") == FaultSchedule(cuts=(3.5, 12.0))
    every = parse_faults("every:2")
    assert every is not None and [t for t, _ in zip(every.times(), range(3))] == [2.0, 4.0, 6.0]
    rnd = parse_faults("random:5:7:10")
    assert rnd is not None and len(rnd.cuts) == 5 and all(0 <= t < 10 for t in rnd.cuts)
    assert rnd == parse_faults("random:5:7:10")  # reproducible from the seed
    mixed = parse_faults("stall@4+1.5,cut@2")
    assert mixed is not None and list(mixed.events()) == [(2.0, None), (4.0, 1.5)]
    for bad in ("cut12", "every:0", "random:0:1", "blackhole@3", "stall@3", "stall@3+0"):
        with pytest.raises(ValueError, match="expected none, cut@T"):
            parse_faults(bad)


async def test_a_stall_is_ridden_out_without_reconnecting(cloud_server):
    """No delivery for 1.5 s, connections open (a radio fade): the steps wait and
    go on; nothing is re-dialled, nothing lost."""
    async with ShapingProxy(target=("127.0.0.1", cloud_server.port), network=PROFILES["wifi"]) as proxy:

        def on_step(ev):
            if ev.step == 10:
                proxy.stall(1.5)

        cfg = TrainConfig(**{**EXACT, "staleness": 2, "epochs": 3})
        client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg, progress=on_step)
        result = await asyncio.wait_for(client.run(), timeout=120)
    assert proxy.stalls == 1 and proxy.cuts == 0
    assert result.reconnects == [] and result.steps == 36
    gaps = [b - a for a, b in zip(result.step_times, result.step_times[1:])]
    assert max(gaps) >= 1.4  # the steps waited out the stall
    (closed,) = cloud_server.stats.closed
    assert closed["steps"] == 36


@pytest.mark.slow
def test_emulate_with_faults_survives_them_and_reports_each_drop(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "edge_sdk", "emulate", "--network", "wifi", "--device-slowdown", "4", "--point", "2"]
    cmd += ["--epochs", "2", "--max-steps-per-epoch", "40", "--faults", "every:0.7", "--no-progress", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps"] == 80 and len(report["reconnects"]) >= 2, report["reconnects"]
    assert "reconnecting in" in proc.stderr and "Traceback" not in proc.stderr
