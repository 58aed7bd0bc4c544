"""The decision engine moves the cut at run time when the link changes.

A real server, the shaping proxy and the device with auto point/codec/K: the link
starts fast and becomes slow mid-run; the engine must switch to a configuration
with smaller uploads within 30 steps, and training must go on with exact step
accounting across the move.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from edge_sdk.client import EdgeClient
from edge_sdk.decision.controller import DecisionController
from edge_sdk.emulation.network import PROFILES, LinkProfile
from edge_sdk.emulation.proxy import ShapingProxy
from edge_sdk.training import TrainConfig

pytestmark = pytest.mark.slow

SLOW = LinkProfile(name="slow", uplink_bps=0.5e6, downlink_bps=0.5e6, one_way_latency_up_s=0.03, one_way_latency_down_s=0.03)


def steps_alone(client: EdgeClient) -> int:
    """Steps the device trained alone (device-only: the cloud never saw them)."""
    return client.session.steps_by_choice.get(f"p={client.setup.spec.model.num_blocks} fp32 K=0", 0)


async def test_engine_moves_to_smaller_uploads_after_the_link_slows_down(cloud_server):
    # among splits: at 4x, WiFi splitting and training alone nearly tie, and the
    # device-only path has its own test below
    cfg = TrainConfig(epochs=2, batch_size=32, device_slowdown=4.0, evaluate=False, allow_device_only=False)
    server = cloud_server
    async with ShapingProxy(target=("127.0.0.1", server.port), network=PROFILES["wifi"]) as proxy:

        def on_step(ev):
            if ev.step == 30:
                proxy.network = SLOW  # the link collapses mid-run

        client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg, progress=on_step)
        result = await asyncio.wait_for(client.run(), timeout=240)
    assert isinstance(client.session.controller, DecisionController)
    history = result.partition_history
    in_force = [h for h in history if h["step"] <= 30 and (h["switch"] or h is history[0])][-1]
    after = [h for h in history if h["step"] > 30 and h["switch"]]
    assert after, [(h["step"], round(h["time_s"], 1), h.get("reason", "")[:300]) for h in history]
    first = after[0]
    assert first["step"] - 30 <= 30
    feature_bytes = client.session.controller.base_inputs.feature_nbytes
    assert feature_bytes(first["point"], first["codec"]) < feature_bytes(in_force["point"], in_force["codec"]), (in_force, first)
    assert first["link"]["uplink_bps"] < 1e6  # it decided on the measured slow link, not the old one
    assert result.steps == client.setup.total_steps(cfg)  # every step applied once, across the moves
    (closed,) = server.stats.closed
    assert closed["steps"] == result.steps - steps_alone(client)  # the cloud applied every split step once


async def test_engine_moves_work_to_the_device_when_the_cloud_slows_down(cloud_server):
    # a device as fast as the cloud and a fast link: the cut starts shallow; then
    # the cloud becomes 40x slower (a loaded or smaller cloud) and the blocks it
    # runs cost more there than on the device
    cfg = TrainConfig(epochs=2, batch_size=32, device_slowdown=1.0, evaluate=False, point=None, allow_device_only=False)
    server = cloud_server
    async with ShapingProxy(target=("127.0.0.1", server.port), network=PROFILES["wifi"]) as proxy:

        def on_step(ev):
            if ev.step == 30:
                (session,) = server.stats.sessions.values()
                session.config = replace(session.config, compute_slowdown=40.0)

        client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg, progress=on_step)
        result = await asyncio.wait_for(client.run(), timeout=240)
    history = result.partition_history
    before = [h for h in history if h["step"] <= 30 and not h.get("waiting")][-1]
    after = [h for h in history if h["step"] > 30 and h["switch"]]
    assert after and after[0]["step"] - 30 <= 30, history
    assert after[-1]["point"] > before["point"], (before, after)  # more blocks on the device
    assert "bound by cloud" in after[0]["reason"]  # it saw why
    assert result.steps == client.setup.total_steps(cfg)


async def test_engine_trains_alone_while_the_link_is_poor_and_splits_again_when_it_recovers(cloud_server):
    # a Pi-class device: on WiFi splitting pays; on a 250 kbit/s radio every split is
    # slower than training alone; then the WiFi comes back
    cfg = TrainConfig(epochs=6, batch_size=32, device_slowdown=10.0, evaluate=False)
    poor = PROFILES["iot"]
    server = cloud_server
    async with ShapingProxy(target=("127.0.0.1", server.port), network=PROFILES["wifi"]) as proxy:

        def on_step(ev):
            if ev.step == 30:
                proxy.network = poor
            if client.session.pipeline.device_only and proxy.network is poor and ev.step >= 60:
                proxy.network = PROFILES["wifi"]  # recovers while the device trains alone
                recovered.append(ev.step)

        recovered: list[int] = []
        client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg, progress=on_step)
        result = await asyncio.wait_for(client.run(), timeout=300)
    L = client.setup.spec.model.num_blocks
    switches = [h for h in result.partition_history if h["switch"]]
    alone = [h for h in switches if h["point"] == L and h["step"] > 30]
    # it goes alone after the drop; how fast is bench/decision.py's goal (30 steps: 7
    # measured there), here only bounded: a fresh CI box once took 46 steps of ~2 s
    assert alone and alone[0]["step"] - 30 <= 60, switches
    assert recovered, "the device never trained alone long enough to see the link recover"
    back = [h for h in switches if h["step"] > recovered[0] and h["point"] < L]
    assert back, switches  # and the cut came back once the probes saw the link recover:
    # on a measured fast uplink (a detected jump, or the estimators' window moving on)
    assert back[0]["link"]["uplink_bps"] > 4 * poor.uplink_bps, back[0]
    assert result.steps == client.setup.total_steps(cfg)
    (closed,) = server.stats.closed
    # the cloud applied exactly the steps that were split; the device trained the rest
    assert closed["steps"] == result.steps - steps_alone(client) and steps_alone(client) > 0
