"""Context estimates through the shaping proxy at known link settings.

The device's estimates of uplink, downlink and RTT must land within +/-20 % of
what the proxy was configured with, after at most 20 training steps.
"""

from __future__ import annotations

import asyncio

import pytest

from edge_sdk.client import EdgeClient
from edge_sdk.emulation.network import LinkProfile
from edge_sdk.emulation.proxy import ShapingProxy
from edge_sdk.training import TrainConfig

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "up_mbps, down_mbps, rtt_ms",
    [(2, 10, 20), (10, 50, 100), (50, 50, 10)],
)
async def test_estimates_match_the_configured_link(up_mbps, down_mbps, rtt_ms, cloud_server):
    link = LinkProfile(
        name="test",
        uplink_bps=up_mbps * 1e6,
        downlink_bps=down_mbps * 1e6,
        one_way_latency_up_s=rtt_ms / 2e3,
        one_way_latency_down_s=rtt_ms / 2e3,
    )
    # fp32 features and gradients at the first cut: 32 KiB per frame each way
    cfg = TrainConfig(epochs=1, max_steps_per_epoch=20, point=1, codec="fp32", grad_codec="fp32", staleness=2)
    server = cloud_server
    async with ShapingProxy(target=("127.0.0.1", server.port), network=link) as proxy:
        client = EdgeClient(f"ws://127.0.0.1:{proxy.port}", cfg)
        await asyncio.wait_for(client.run(), timeout=120)
    snap = client.session.tracker.snapshot()
    assert snap.uplink_bps == pytest.approx(up_mbps * 1e6, rel=0.2), snap
    assert snap.downlink_bps == pytest.approx(down_mbps * 1e6, rel=0.2), snap
    # a late read or a busy loop only ever adds delay: tight below, looser above
    assert 0.9 * rtt_ms / 1e3 <= snap.rtt_s <= 1.35 * rtt_ms / 1e3, snap
