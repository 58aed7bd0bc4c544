"""Checkpoints and restarts: both sides save at agreed, drained steps; a cloud that
restarts (its memory gone) and a device that restarts from its own checkpoint
both roll back to the newest step both hold, and the run goes on as if nothing
happened (issue: training survives the network and the server)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from cloud_backend.session import CloudSession, SessionConfig
from cloud_backend.state_dir import StateDir, WrongResumeToken
from edge_sdk.checkpoints import CheckpointError, CheckpointStore
from edge_sdk.device_checkpoint import DeviceCheckpoint
from edge_sdk.emulation.inprocess import InProcessLink
from edge_sdk.session import EdgeSession
from edge_sdk.training import TrainConfig, build_local
from schemas import frames as fr
from tests.test_resume import _merged  # head from the device, tail from the cloud

EXACT = dict(
    point=2,
    codec="fp32",
    grad_codec="fp32",
    staleness=0,
    batch_size=16,
    epochs=3,
    max_steps_per_epoch=12,
    checkpoint_every=5,
)


class DeviceDied(Exception):
    """The device process is gone (what SIGKILL does to the in-process run)."""


def _run(tmp_path, cuts=None, *, state=None, cloud=None, edge=None, **over):
    cfg = TrainConfig(**{**EXACT, **over})
    state = state or StateDir(tmp_path / "cloud")
    if edge is None:
        torch.manual_seed(cfg.seed)
        edge = EdgeSession(cfg, build_local(cfg))
    cloud = cloud or CloudSession(1, SessionConfig(checkpoints=True, resume_secret=state.secret()))
    link = InProcessLink(edge, cloud, cuts=cuts, state=state)
    result = link.drive(edge.run(0.0))
    assert link.cloud is not None
    return edge, link.cloud, link, result


def _assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=k)


# ------------------------------------------------------------- the store
def test_a_save_is_atomic_and_only_the_newest_are_kept(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "s", keep=2)
    for step in (3, 8, 13):
        saved = store.save(step, {"w": torch.full((4,), float(step)), "n": torch.tensor(step)}, {"note": f"at {step}"})
        assert saved.nbytes > 0 and saved.seconds >= 0
    assert store.steps() == [8, 13]
    tensors, manifest = store.load(13)
    assert torch.equal(tensors["w"], torch.full((4,), 13.0)) and manifest["note"] == "at 13" and manifest["step"] == 13

    # killed half-way through a save: the previous checkpoint is whole, nothing half-written is listed
    def killed(*_args):
        raise OSError("killed")

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(OSError):
        store.save(18, {"w": torch.zeros(4)}, {})
    monkeypatch.undo()
    assert store.steps() == [8, 13] and not list((tmp_path / "s").glob(".tmp-*"))
    (tmp_path / "s" / ".tmp-step-000000000023-dead").mkdir()  # a leftover of a SIGKILL
    assert CheckpointStore(tmp_path / "s").steps() == [8, 13] and not list((tmp_path / "s").glob(".tmp-*"))

    with pytest.raises(CheckpointError, match="no checkpoint of step 5"):
        store.load(5)
    (tmp_path / "s" / "step-000000000013" / "tensors.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="step-000000000013"):
        store.load(13)
    manifest_path = tmp_path / "s" / "step-000000000008" / "manifest.json"
    manifest_path.write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        store.load(8)
    (tmp_path / "s" / "mine.txt").write_text("a user's file")
    store.remove()
    assert store.steps() == [] and (tmp_path / "s" / "mine.txt").exists()  # only our folders go


def test_the_resume_key_survives_a_restart_and_is_private(tmp_path):
    a, b = StateDir(tmp_path), StateDir(tmp_path)
    assert a.secret() == b.secret() and len(a.secret()) == 32
    assert (tmp_path / "secret").stat().st_mode & 0o077 == 0


# ------------------------------------------------------ in-process restarts
def test_two_cloud_restarts_and_cuts_are_invisible_at_k0(tmp_path):
    """K=0 fp32, fixed seed: the cloud dies twice (everything in memory lost; it
    comes back from its checkpoints) and the link is cut twice more; both sides
    roll back to the newest checkpoint both hold, and the final weights, the
    accuracies and the step counts equal an uninterrupted run's."""
    edge0, cloud0, link0, plain = _run(tmp_path / "plain")
    cuts = {20: "restart", 33: "request", 46: "reply", link0.sends - 30: "restart"}
    edge, cloud, link, resumed = _run(tmp_path / "faulty", cuts)
    assert not link.cuts and link.restarts == 2
    assert len(resumed.rollbacks) == 2 and all(r["to_step"] <= r["from_step"] for r in resumed.rollbacks)
    _assert_same_model(_merged(edge0, cloud0), _merged(edge, cloud))
    assert resumed.steps == plain.steps == 36 == edge.pipeline.steps_applied == cloud.applied_steps
    assert cloud.last_step == 35 and edge.pipeline.next_step == 36
    assert [h["test_accuracy"] for h in resumed.history] == [h["test_accuracy"] for h in plain.history]
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]  # no epoch recorded twice
    # checkpoints at step 0, every 5 steps inside an epoch and at each epoch end
    assert plain.checkpoints["saved"] == 10 and plain.checkpoints["step"] == 36


def test_restarts_with_steps_in_flight_apply_every_step_once(tmp_path):
    """K=2 int8: what was in flight at a restart is abandoned on both sides and
    trained again from the checkpoint, so each of the run's steps is in the final
    model once."""
    over = dict(staleness=2, codec="int8", grad_codec="fp16")
    _, _, link0, _ = _run(tmp_path / "plain", **over)
    edge, cloud, link, result = _run(tmp_path / "faulty", {25: "restart", link0.sends - 20: "restart"}, **over)
    assert link.restarts == 2 and len(result.rollbacks) == 2
    assert result.steps == 36 == edge.pipeline.steps_applied == cloud.applied_steps
    assert cloud.last_step == 35 and edge.pipeline.next_step == 36 and not edge.pipeline.in_flight


def test_a_device_restarted_from_its_checkpoint_matches_the_uninterrupted_run(tmp_path):
    """The device process dies at step 20 (the cloud lives on, ahead of the
    device's newest checkpoint); a new process loads that checkpoint from disk,
    the cloud rolls back to the same step, and the run ends where the
    uninterrupted one does."""
    edge0, cloud0, _, plain = _run(tmp_path / "plain")
    state = StateDir(tmp_path / "cloud")
    cloud = CloudSession(1, SessionConfig(checkpoints=True, resume_secret=state.secret()))
    cfg = TrainConfig(**EXACT, checkpoint_dir=str(tmp_path / "device"))

    def die(ev):
        if ev.step == 20:
            raise DeviceDied

    torch.manual_seed(cfg.seed)
    first = EdgeSession(cfg, build_local(cfg), progress=die)
    with pytest.raises(DeviceDied):
        InProcessLink(first, cloud, state=state).drive(first.run(0.0))
    assert cloud.last_step == 20  # the cloud applied past the device's newest checkpoint
    checkpoint = DeviceCheckpoint.load(tmp_path / "device")
    # checkpoints at 0, 5, 10, 12 (epoch end), 17, 22, 24, ...: the newest before step 20 is 17
    assert (checkpoint.step, checkpoint.epoch, checkpoint.batch) == (17, 1, 5)
    assert "token" not in checkpoint.manifest["config"]  # the server's secret is not written down

    torch.manual_seed(12345)  # another process: its RNG comes from the checkpoint, not from here
    again = EdgeSession(checkpoint.config(), build_local(checkpoint.config()), resume_from=checkpoint)
    edge, cloud, _, resumed = _run(tmp_path, state=state, cloud=cloud, edge=again)
    _assert_same_model(_merged(edge0, cloud0), _merged(edge, cloud))
    assert resumed.steps == 36 == cloud.applied_steps and cloud.last_step == 35
    assert [h["test_accuracy"] for h in resumed.history] == [h["test_accuracy"] for h in plain.history]
    assert resumed.rollbacks[0]["reason"] == "the device restarted (--resume)"


def test_a_restore_checks_the_token_first_and_refuses_a_step_it_does_not_hold(tmp_path):
    state = StateDir(tmp_path)
    edge, *_ = _run(tmp_path, state=state)  # session 1's newest two checkpoints stay (the in-process link deletes nothing)
    assert state.store(1).steps() == [34, 36]
    config = SessionConfig(checkpoints=True, resume_secret=state.secret())
    with pytest.raises(WrongResumeToken):  # nothing is said about a session without its token
        state.restore(1, 34, config, "0" * 64)
    with pytest.raises(WrongResumeToken):
        state.restore(77, 3, config, edge.resume_token)
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 999 on this cloud \(it holds: 34, 36\)"):
        state.restore(1, 999, config, edge.resume_token)
    restored = state.restore(1, 34, config, edge.resume_token)
    assert restored.restored_step == 34 and restored.resume_token == edge.resume_token
    assert state.store(1).steps() == [34]  # rolled back: the later checkpoint is abandoned


def test_a_session_id_that_comes_again_does_not_take_an_older_token():
    config = SessionConfig(resume_secret=b"k" * 32)
    assert CloudSession(5, config).resume_token != CloudSession(5, config).resume_token


def test_a_checkpoint_saved_before_the_cloud_died_unacknowledged(tmp_path):
    """The cloud saves a checkpoint and dies before its ack goes out: the device
    holds only the one before, the cloud both; they roll back to the older one and
    the run still ends with an uninterrupted run's weights."""
    edge0, cloud0, link0, _ = _run(tmp_path / "plain")
    asks = [i + 1 for i, f in enumerate(link0.sent) if isinstance(f, fr.Checkpoint)]  # send numbers
    edge, cloud, _, resumed = _run(tmp_path / "faulty", {asks[4]: "restart-late"})
    (back,) = resumed.rollbacks
    assert back["to_step"] == link0.sent[asks[3] - 1].step  # the newest the device held
    _assert_same_model(_merged(edge0, cloud0), _merged(edge, cloud))
    assert resumed.steps == 36 == cloud.applied_steps


def test_a_lost_answer_to_a_restoring_resume_rolls_back_on_the_next(tmp_path):
    """The cloud restored the session and answered, the answer was lost: the device
    dials again and is still told to roll back (until it sends anything else)."""
    edge0, cloud0, _, _ = _run(tmp_path / "plain")
    edge, cloud, link, resumed = _run(tmp_path / "faulty", {20: "restart", 21: "reply"})
    hellos = [f for f in link.sent if isinstance(f, fr.Hello) and f.resume_session]
    assert len(hellos) == 2 and len(resumed.rollbacks) == 1
    _assert_same_model(_merged(edge0, cloud0), _merged(edge, cloud))


def test_against_a_cloud_without_checkpoints_nothing_is_saved(tmp_path, caplog):
    cfg = TrainConfig(**EXACT, checkpoint_dir=str(tmp_path / "device"))
    torch.manual_seed(cfg.seed)
    edge, cloud = EdgeSession(cfg, build_local(cfg)), CloudSession(1)
    link = InProcessLink(edge, cloud)
    with caplog.at_level("WARNING", logger="edge_sdk"):
        result = link.drive(edge.run(0.0))
    assert not any(isinstance(f, fr.Checkpoint) for f in link.sent)
    assert result.checkpoints["saved"] == 0 and not (tmp_path / "device").exists()
    assert "the cloud keeps no checkpoints" in caplog.text


def test_a_checkpoint_with_steps_applied_past_it_is_refused():
    """The cloud takes a checkpoint only where nothing past it was applied (the device drained)."""
    cfg = TrainConfig(**{**EXACT, "staleness": 2})
    torch.manual_seed(0)
    edge, cloud = EdgeSession(cfg, build_local(cfg)), CloudSession(1, SessionConfig(checkpoints=True))
    link = InProcessLink(edge, cloud)
    link.drive(edge.handshake())
    x, y = next(iter(edge.setup.train_loader(cfg, 0)))
    for _ in range(3):
        link.drive(edge.train_batch(x, y, 0))
    (err,) = cloud.handle(fr.Checkpoint(step=1, epoch=0))
    assert isinstance(err, fr.Error) and "step 2 is applied already" in err.message
    (ack,) = cloud.handle(fr.Checkpoint(step=3, epoch=0))
    assert isinstance(ack, fr.CheckpointAck) and ack.saved and cloud.pending_checkpoint is not None


# ------------------------------------------------------------ the server
async def test_a_server_restarted_on_its_state_dir_restores_the_session(tmp_path):
    """The server's memory is gone (a new `CloudServer` on the same port and state
    dir); the device re-dials, the new server restores the session from its
    checkpoint and both sides roll back to it; the run finishes with exact counts
    and the session's folder is deleted at the goodbye."""
    from cloud_backend.server import CloudServer, ServerConfig
    from edge_sdk.client import EdgeClient

    state_dir = tmp_path / "state"
    first = CloudServer(ServerConfig(port=0, state_dir=str(state_dir)))
    await first.start()
    port = first.port
    cfg = TrainConfig(**{**EXACT, "staleness": 2, "codec": "int8"})
    restarted: list[CloudServer] = []

    async def restart() -> None:
        await first.close()  # a redeploy: the sessions' connections go away (1001), its memory with it
        second = CloudServer(ServerConfig(port=port, state_dir=str(state_dir)))
        await second.start()
        restarted.append(second)

    def on_step(ev):
        if ev.step == 17 and not restarted:
            asyncio.get_running_loop().create_task(restart())

    client = EdgeClient(f"ws://127.0.0.1:{port}", cfg, progress=on_step)
    try:
        result = await asyncio.wait_for(client.run(), timeout=120)
    finally:
        for server in restarted:
            await server.close()
    (second,) = restarted
    assert result.rollbacks and result.rollbacks[0]["to_step"] <= 17
    assert result.steps == 36 == client.session.pipeline.steps_applied
    (closed,) = second.stats.closed
    assert closed["steps"] == 36 and closed["last_step"] == 35
    assert not list((state_dir / "sessions").iterdir())  # the session ended: its checkpoints went with it


async def test_sessions_found_in_the_state_dir_expire_after_the_ttl(tmp_path):
    from cloud_backend.server import CloudServer, ServerConfig

    state = StateDir(tmp_path)
    state.store(41).save(0, {"x": torch.zeros(1)}, {})
    server = CloudServer(ServerConfig(port=0, state_dir=str(tmp_path), session_ttl_s=30, max_sessions=2))
    await server.start()
    try:
        assert state.session_ids() == [41]
        left = server._expiry[41].when() - asyncio.get_running_loop().time()
        assert 29 < left <= 30  # the TTL's timer is armed from start-up
        assert next(server._ids) == 42  # new sessions take ids after those on disk
        assert server._sessions_held() == 1  # its slot is kept for its device
        server._expire(41)  # what the timer calls
        assert server._sessions_held() == 0
    finally:
        await server.close()  # waits for the folder's deletion
    assert state.session_ids() == []


# ------------------------------------------------- processes, SIGKILL included
def _serve(port: int, state_dir, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cloud_backend", "serve", "--port", str(port), "--state-dir", str(state_dir), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once listening
    assert "listening on" in line, line
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_twenty_cuts_and_two_sigkilled_clouds_leave_the_model_exact(tmp_path):
    """Over TCP, K=0 fp32: 20 connection cuts through the proxy and two SIGKILLs of
    `cloud_backend serve` (restarted on the same --state-dir and port) end with
    the weights of an uninterrupted run over the same kind of link, to 1e-6."""
    from edge_sdk.client import EdgeClient
    from edge_sdk.emulation.proxy import ShapingProxy

    cfg = dict(EXACT, epochs=4, checkpoint_every=10, reconnect_timeout_s=60.0)
    models = {}
    for name in ("plain", "faulty"):
        port = _free_port()
        procs = [_serve(port, tmp_path / name / "state")]
        run_cfg = TrainConfig(**cfg, save_model=str(tmp_path / name / "model.safetensors"))
        async with ShapingProxy(target=("127.0.0.1", port)) as proxy:
            cuts = set(range(3, 47, 2)) - {17, 31} if name == "faulty" else set()
            kills = {17, 31} if name == "faulty" else set()

            def on_step(ev, cuts=cuts, kills=kills, procs=procs, port=port, name=name):
                if ev.step in cuts:
                    cuts.discard(ev.step)
                    proxy.cut()
                if ev.step in kills:
                    kills.discard(ev.step)
                    procs[-1].send_signal(signal.SIGKILL)
                    procs[-1].wait()
                    procs.append(_serve(port, tmp_path / name / "state"))

            assert len(cuts) in (0, 20)
            client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", run_cfg, progress=on_step)
            try:
                result = await asyncio.wait_for(client.run(), timeout=300)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
        assert not cuts and not kills
        if name == "faulty":
            assert len(result.rollbacks) == 2 and len(result.reconnects) >= 22
        assert result.steps == 48 == client.session.pipeline.steps_applied
        models[name] = {k: v.clone() for k, v in client.session.setup.spec.model.state_dict().items()}
    _assert_same_model(models["plain"], models["faulty"])


@pytest.mark.slow
def test_a_sigkilled_device_resumes_from_its_checkpoint_dir(tmp_path):
    """`python -m edge_sdk train --checkpoint-dir` killed with SIGKILL after its
    second epoch line; `--resume` finishes the run, and the saved model equals an
    uninterrupted run's (K=0 fp32)."""
    from safetensors.torch import load_file

    port = _free_port()
    server = _serve(port, tmp_path / "state")
    common = [
        sys.executable, "-m", "edge_sdk", "train", "--server", f"ws://127.0.0.1:{port}", "--point", "2",
        "--codec", "fp32", "--grad-codec", "fp32", "--staleness", "0", "--batch-size", "16", "--epochs", "4",
        "--max-steps-per-epoch", "12", "--no-progress",
    ]  # fmt: skip
    try:
        plain = subprocess.run(
            [*common, "--save-model", str(tmp_path / "plain.safetensors")], capture_output=True, text=True, timeout=300
        )
        assert plain.returncode == 0, plain.stderr
        args = [*common, "--checkpoint-dir", str(tmp_path / "dev"), "--save-model", str(tmp_path / "resumed.safetensors")]
        victim = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        assert victim.stderr is not None
        for line in victim.stderr:
            if line.startswith("epoch 2/"):
                victim.send_signal(signal.SIGKILL)
                break
        victim.wait()
        assert victim.returncode == -signal.SIGKILL
        assert (tmp_path / "dev").is_dir() and not (tmp_path / "resumed.safetensors").exists()
        resumed = subprocess.run(
            [sys.executable, "-m", "edge_sdk", "train", "--server", f"ws://127.0.0.1:{port}", "--no-progress",
             "--checkpoint-dir", str(tmp_path / "dev"), "--resume"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming session" in resumed.stderr and "epoch 4/4" in resumed.stderr
    finally:
        server.kill()
        server.wait()
    _assert_same_model(load_file(str(tmp_path / "plain.safetensors")), load_file(str(tmp_path / "resumed.safetensors")))
    assert not (tmp_path / "dev").exists()  # the finished run left no checkpoint behind
