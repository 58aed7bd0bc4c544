"""The decision engine moves the cut at run time when the link changes.

A real server, the shaping proxy and the device with auto point/codec/K: the link
starts fast and becomes slow mid-run; the engine must switch to a configuration
with smaller uploads within 30 steps, and training must go on with exact step
accounting across the move.
"""

from __future__ import annotations

import asyncio

import pytest

from cloud_backend.server import CloudServer, ServerConfig
from edge_sdk.client import EdgeClient
from edge_sdk.decision.controller import DecisionController
from edge_sdk.emulation.network import PROFILES, LinkProfile
from edge_sdk.emulation.proxy import ShapingProxy
from edge_sdk.training import TrainConfig

pytestmark = pytest.mark.slow

SLOW = LinkProfile(name="slow", uplink_bps=0.5e6, downlink_bps=0.5e6, one_way_latency_up_s=0.03, one_way_latency_down_s=0.03)


async def test_engine_moves_to_smaller_uploads_after_the_link_slows_down():
    cfg = TrainConfig(epochs=2, batch_size=32, device_slowdown=4.0, evaluate=False)
    async with CloudServer(ServerConfig(port=0)) as server:
        async with ShapingProxy(target=("127.0.0.1", server.port), network=PROFILES["wifi"]) as proxy:

            def on_step(ev):
                if ev.step == 30:
                    proxy.network = SLOW  # the link collapses mid-run

            client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg, progress=on_step)
            result = await asyncio.wait_for(client.run(), timeout=240)
    assert isinstance(client.controller, DecisionController)
    history = result.partition_history
    in_force = [h for h in history if h["step"] <= 30 and (h["switch"] or h is history[0])][-1]
    after = [h for h in history if h["step"] > 30 and h["switch"]]
    assert after, history
    first = after[0]
    assert first["step"] - 30 <= 30
    feature_bytes = client.controller.base_inputs.feature_nbytes
    assert feature_bytes(first["point"], first["codec"]) < feature_bytes(in_force["point"], in_force["codec"]), (in_force, first)
    assert client.tracker.snapshot().uplink_bps < 1e6  # it measured the slow link
    assert result.steps == client.setup.total_steps(cfg)  # every step applied once, across the moves
    (closed,) = server.stats.closed
    assert closed["steps"] == result.steps
