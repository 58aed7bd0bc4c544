"""What an operator controls and sees (issue 16 §1-2): the shared memory budget
(`serve --max-memory`), Prometheus metrics (`serve --metrics-port`) and one log
record per session event, with its fields."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from cloud_backend.cli import configure_logging
from cloud_backend.memory_budget import MemoryBudget
from cloud_backend.server import CloudServer, ServerConfig
from cloud_backend.session import CloudSession, SessionConfig
from edge_sdk.client import EdgeClient
from edge_sdk.session import TrainingError
from edge_sdk.training import TrainConfig
from schemas import frames as fr
from schemas.errors import ErrorCode

QUICK = dict(epochs=1, max_steps_per_epoch=6, batch_size=8, point=2, codec="int8", staleness=1)


def _wire(frame):
    """A frame as the server hands it over: encoded and decoded once."""
    return fr.decode(fr.encode(fr.Envelope(frame=frame))).frame


def _need(hello: fr.Hello, point: int | None = None) -> int:
    """What one session's Hello reserves (its estimate at the Hello's cut)."""
    probe = CloudSession(99)
    (ack,) = probe.handle(_wire(hello))
    assert isinstance(ack, fr.HelloAck)
    if point is not None:
        probe.point = point
    return probe.memory_bytes


def test_the_shared_budget_refuses_a_new_session_that_does_not_fit_until_another_ends(digits_spec, hello_frame):
    hello = hello_frame(digits_spec)
    need = _need(hello)
    budget = MemoryBudget(int(need * 1.5))  # room for one session, not two
    config = SessionConfig(memory_budget=budget)
    a, b = CloudSession(1, config), CloudSession(2, config)
    assert isinstance(a.handle(_wire(hello))[0], fr.HelloAck)
    assert budget.held(a.budget_key) == need == a.memory_bytes
    (err,) = b.handle(_wire(hello))
    assert isinstance(err, fr.Error) and err.code == ErrorCode.SERVER_BUSY
    assert "server memory is taken" in err.message and "1 other sessions hold the rest" in err.message
    assert budget.held(b.budget_key) == 0 and b.spec is None  # refused before the model was built
    budget.release(a.budget_key)  # the server frees a session's reservation when it ends
    c = CloudSession(3, config)
    assert isinstance(c.handle(_wire(hello))[0], fr.HelloAck) and budget.reserved_bytes == need
    # a session that alone exceeds the whole budget will never fit: another code, another message
    (err,) = CloudSession(4, SessionConfig(memory_budget=MemoryBudget(need // 2))).handle(_wire(hello))
    assert err.code == ErrorCode.LIMIT_EXCEEDED and "the whole server has" in err.message


def test_a_running_session_holds_what_its_cut_needs_and_is_never_refused_for_the_shared_budget(digits_spec, hello_frame):
    hello = hello_frame(digits_spec)  # point 2
    L = digits_spec.model.num_blocks
    s = CloudSession(1, SessionConfig(memory_budget=MemoryBudget(_need(hello))))  # full once s is in
    s.handle(_wire(hello))
    budget = s.config.memory_budget
    at_2 = budget.held(s.budget_key)
    # deeper cut: blocks [2, L-1) go to the device, the cloud keeps one block
    replies = s.handle(_wire(fr.Repartition(step=0, point=L - 1, codec="int8", staleness=0)))
    assert isinstance(replies[-1], fr.RepartitionAck) and replies[-1].accepted
    assert budget.held(s.budget_key) == s.memory_bytes == _need(hello, point=L - 1) < at_2
    # back to point 2 (the device's weights would come up first): taken although the budget
    # is full, since ending a running training for the shared budget would be worse
    s._check_memory(s.plan, 2, s.batch_size, s.optimizer_config)
    assert budget.held(s.budget_key) == at_2 == budget.total_bytes
    # a refused move (blocks coming up without their weights) settles on the cut in effect
    (err,) = s.handle(_wire(fr.Repartition(step=1, point=1, codec="int8", staleness=0)))
    assert isinstance(err, fr.Error) and s.point == L - 1 and budget.held(s.budget_key) == s.memory_bytes


def test_a_restore_holds_memory_per_object_and_a_failed_one_holds_none(digits_spec, hello_frame):
    """A restore builds a second object for the same session id (a roll back
    replaces the live one): each object has its own entry, and one whose restore
    fails leaves none behind."""
    hello = hello_frame(digits_spec)
    budget = MemoryBudget(1 << 30)
    config = SessionConfig(memory_budget=budget)
    live = CloudSession(1, config)
    live.handle(_wire(hello))
    tensors, manifest = live.checkpoint_state()
    manifest = {**manifest, "step": 0}
    broken = {k: v for k, v in tensors.items() if not k.startswith("param/")}
    with pytest.raises(ValueError, match="holds other params"):
        CloudSession.restore(1, config, broken, manifest)
    assert budget.reserved_bytes == live.memory_bytes  # the failed object's entry is gone
    restored = CloudSession.restore(1, config, tensors, manifest)
    assert budget.held(restored.budget_key) == budget.held(live.budget_key) == live.memory_bytes
    budget.release(live.budget_key)  # what the server does when the restored one takes over
    assert budget.reserved_bytes == restored.memory_bytes


async def test_the_server_frees_each_sessions_reservation_when_it_ends(digits_spec, hello_frame):
    need = _need(hello_frame(digits_spec))
    async with CloudServer(ServerConfig(port=0, max_memory_bytes=int(need * 1.5))) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with connect(url, compression=None, max_size=None) as holder:
            await holder.send(fr.encode(fr.Envelope(frame=hello_frame(digits_spec))))
            assert isinstance(fr.decode(await holder.recv()).frame, fr.HelloAck)
            assert server.budget.reserved_bytes == need
            with pytest.raises(TrainingError, match=r"^cloud refused: server memory is taken: .* \(SERVER_BUSY\)$"):
                await EdgeClient(url, TrainConfig(**QUICK)).run()
            assert server.budget.reserved_bytes == need  # the refused one holds nothing
        await server.wait_idle(10)
        assert server.budget.reserved_bytes == 0
        assert (await asyncio.wait_for(EdgeClient(url, TrainConfig(**QUICK)).run(), timeout=120)).steps == 6
        await server.wait_idle(10)
        assert server.budget.reserved_bytes == 0


def _scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.name: m.samples for m in text_string_to_metric_families(text)}


def _value(metrics: dict[str, list], name: str, sample: str | None = None, **labels: str) -> float:
    for s in metrics[name]:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, sample, labels))


async def test_metrics_count_steps_bytes_refusals_and_show_each_sessions_memory(caplog, digits_spec, hello_frame):
    caplog.set_level(logging.INFO, logger="cloud_backend")
    cfg = ServerConfig(port=0, token="s3cret", metrics_port=0, max_sessions=1)
    async with CloudServer(cfg) as server:
        url = f"ws://127.0.0.1:{server.port}"
        assert _value(await asyncio.to_thread(_scrape, server.metrics_port), "splitreplay_sessions_active") == 0
        with pytest.raises(TrainingError, match=r"UNAUTHORIZED"):
            await EdgeClient(url, TrainConfig(**QUICK, token="wrong")).run()
        # a device holds the only slot ...
        async with connect(url, compression=None, max_size=None) as holder:
            await holder.send(fr.encode(fr.Envelope(frame=hello_frame(digits_spec, token="s3cret"))))
            assert isinstance(fr.decode(await holder.recv()).frame, fr.HelloAck)
            held = await asyncio.to_thread(_scrape, server.metrics_port)
            # ... so the next one is refused, in one line
            with pytest.raises(TrainingError, match=r"^cloud refused: server is at its limit of 1 sessions \(SERVER_BUSY\)$"):
                await EdgeClient(url, TrainConfig(**QUICK, token="s3cret")).run()
        await server.wait_idle(10)
        result = await asyncio.wait_for(EdgeClient(url, TrainConfig(**QUICK, token="s3cret")).run(), timeout=120)
        await server.wait_idle(10)
        after = await asyncio.to_thread(_scrape, server.metrics_port)
    assert result.steps == 6
    assert _value(held, "splitreplay_sessions_active") == 1
    (mem,) = held["splitreplay_session_memory_bytes"]
    assert mem.labels["model"] == "digits_cnn" and mem.labels["point"] == "2" and mem.value > 0
    assert _value(held, "splitreplay_memory_reserved_bytes") == mem.value
    assert _value(after, "splitreplay_train_steps", "splitreplay_train_steps_total") == 6
    assert _value(after, "splitreplay_step_seconds", "splitreplay_step_seconds_count") == 6
    assert _value(after, "splitreplay_frames_refused", "splitreplay_frames_refused_total", code="UNAUTHORIZED") == 1
    assert _value(after, "splitreplay_frames_refused", "splitreplay_frames_refused_total", code="SERVER_BUSY") == 1
    assert _value(after, "splitreplay_sessions_opened", "splitreplay_sessions_opened_total") == 2
    assert _value(after, "splitreplay_sessions_closed", "splitreplay_sessions_closed_total") == 2
    assert _value(after, "splitreplay_bytes_received", "splitreplay_bytes_received_total") > 6 * 8 * 4
    assert _value(after, "splitreplay_sessions_active") == 0 and after["splitreplay_session_memory_bytes"] == []
    # one record per session event, with its fields for a log pipeline
    events = [r.event for r in caplog.records if hasattr(r, "event")]
    assert events.count("refused") == 2 and events.count("opened") == 2 and events.count("closed") == 2
    last = [r for r in caplog.records if getattr(r, "event", None) == "closed"][-1]
    assert last.steps == 6 and last.session == 4 and last.last_step == 5


def test_json_logs_carry_the_event_fields(capsys):
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        configure_logging("json")
        logging.getLogger("cloud_backend").warning(
            "session 7 closed after 5 train steps", extra={"event": "closed", "session": 7, "steps": 5}
        )
    finally:
        root.handlers[:] = saved
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["event"] == "closed" and record["session"] == 7 and record["steps"] == 5
    assert record["message"] == "session 7 closed after 5 train steps" and record["name"] == "cloud_backend"
