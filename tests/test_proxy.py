"""The shaping proxy on loopback: rates, latencies, traces, byte counts, closing.

Timing tests compare measured times with the link model (serialization at the
configured rate, FIFO, then one-way latency) and allow +-15 %. Transfers are
sized so that each test takes well under 2 s. No test sleeps to synchronize: every
step awaits data or EOF, guarded by ``asyncio.wait_for`` so a bug fails fast
instead of hanging.

CPU contention (this machine has 2 cores shared by parallel test runs) only ever
*adds* delay: a woken thread may wait a few ms for a core. So small RTTs are
estimated by the minimum of several pings, and a timing check that misses is
measured again (up to 3 attempts). A modelling error fails every attempt,
including the lower bound, which contention cannot help to pass.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from edge_sdk.emulation.network import PROFILES, LinkProfile, NetworkTrace
from edge_sdk.emulation.proxy import ProxyThread, ShapingProxy, build_parser, main

MBIT = 1_000_000
GUARD_S = 5.0  # no single await in these tests should come near this
TOL = 0.15

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def profile(up_mbps: float, down_mbps: float, up_ms: float, down_ms: float) -> LinkProfile:
    return LinkProfile("test", up_mbps * MBIT, down_mbps * MBIT, up_ms / 1e3, down_ms / 1e3, source="test")


async def start_server(handler: Handler) -> tuple[asyncio.base_events.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back (so half-close through the proxy is tested)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def command_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """b'U' + 8-byte n: read n bytes, reply b'k'.  b'D' + 8-byte n: send n bytes."""
    try:
        while cmd := await reader.read(1):
            n = int.from_bytes(await reader.readexactly(8), "big")
            if cmd == b"U":
                await reader.readexactly(n)
                writer.write(b"k")
            else:
                writer.write(b"\x00" * n)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    server, port = await start_server(echo_handler)
    async with server:
        yield port


@pytest.fixture
async def command_server() -> AsyncIterator[int]:
    server, port = await start_server(command_handler)
    async with server:
        yield port


async def connect(proxy: ShapingProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), GUARD_S)


async def timed_upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> float:
    """Seconds from the first byte of an n-byte upload to its 1-byte ack."""
    loop = asyncio.get_running_loop()
    payload = b"U" + n.to_bytes(8, "big") + os.urandom(n)
    t0 = loop.time()
    writer.write(payload)
    ack = await asyncio.wait_for(reader.readexactly(1), GUARD_S)
    assert ack == b"k"
    return loop.time() - t0


async def timed_download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    writer.write(b"D" + n.to_bytes(8, "big"))
    await asyncio.wait_for(reader.readexactly(n), GUARD_S)
    return loop.time() - t0


async def min_rtt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes, n: int = 5) -> float:
    """Fastest echo round trip of ``message``: scheduling noise is one-sided."""
    loop = asyncio.get_running_loop()
    rtts = []
    for _ in range(n):
        t0 = loop.time()
        writer.write(message)
        assert await asyncio.wait_for(reader.readexactly(len(message)), GUARD_S) == message
        rtts.append(loop.time() - t0)
    return min(rtts)


Measure = Callable[[], Awaitable[float]]


async def check_model(measure: Measure, expected: float | Callable[[], float], what: str, attempts: int = 3) -> float:
    """Measure until within +-TOL of the model (see the module docstring for why retry).

    ``expected`` may be a callable when the model depends on the attempt (a trace
    whose clock restarts with each proxy); it is read after each measurement.
    """
    seen = []
    for _ in range(attempts):
        measured = await measure()
        model = expected() if callable(expected) else expected
        seen.append(f"{measured * 1e3:.1f} (model {model * 1e3:.1f})")
        if abs(measured - model) <= TOL * model:
            return measured
    pytest.fail(f"{what}: measured " + ", ".join(seen) + " ms")


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), GUARD_S)
    except ConnectionError:
        pass


# -- rates and latencies ----------------------------------------------------------


@pytest.mark.parametrize(
    "mbps, one_way_ms, nbytes",
    [(2, 5, 150_000), (10, 20, 600_000), (50, 50, 2_500_000)],
)
async def test_upload_time_matches_rate_and_latency(command_server: int, mbps: float, one_way_ms: float, nbytes: int) -> None:
    link = profile(mbps, 1000, one_way_ms, one_way_ms)
    async with ShapingProxy(("127.0.0.1", command_server), link) as proxy:
        reader, writer = await connect(proxy)
        # 9 header bytes + payload up, 1-byte ack down (its serialization is negligible)
        expected = (nbytes + 9) * 8 / link.uplink_bps + link.rtt_s
        await check_model(
            lambda: timed_upload(reader, writer, nbytes), expected, f"upload {nbytes} B at {mbps} Mbit/s, {one_way_ms} ms"
        )
        await close_writer(writer)


@pytest.mark.parametrize("mbps, one_way_ms, nbytes", [(2, 30, 150_000), (50, 5, 2_500_000)])
async def test_download_time_matches_rate_and_latency(command_server: int, mbps: float, one_way_ms: float, nbytes: int) -> None:
    # Asymmetric on purpose: a wrong direction mapping would be 10x off.
    link = profile(mbps * 10, mbps, one_way_ms, one_way_ms)
    async with ShapingProxy(("127.0.0.1", command_server), link) as proxy:
        reader, writer = await connect(proxy)
        expected = 9 * 8 / link.uplink_bps + nbytes * 8 / link.downlink_bps + link.rtt_s
        await check_model(
            lambda: timed_download(reader, writer, nbytes), expected, f"download {nbytes} B at {mbps} Mbit/s, {one_way_ms} ms"
        )
        await close_writer(writer)


@pytest.mark.parametrize("up_ms, down_ms", [(5, 5), (20, 10), (50, 50)])
async def test_small_message_rtt(echo_server: int, up_ms: float, down_ms: float) -> None:
    link = profile(10, 10, up_ms, down_ms)
    message = b"p" * 64
    async with ShapingProxy(("127.0.0.1", echo_server), link) as proxy:
        reader, writer = await connect(proxy)
        expected = link.rtt_s + 2 * len(message) * 8 / (10 * MBIT)
        await check_model(lambda: min_rtt(reader, writer, message), expected, f"RTT at {up_ms}+{down_ms} ms")
        await close_writer(writer)


async def test_latency_is_pipelined_not_per_chunk(command_server: int) -> None:
    """Many quanta in flight during the latency: 50 ms adds 100 ms once, not per packet."""
    link = profile(10, 1000, 50, 50)
    nbytes = 400_000  # ~270 quanta of 1500 B
    async with ShapingProxy(("127.0.0.1", command_server), link) as proxy:
        reader, writer = await connect(proxy)
        expected = (nbytes + 9) * 8 / link.uplink_bps + link.rtt_s
        await check_model(lambda: timed_upload(reader, writer, nbytes), expected, "pipelined upload")
        await close_writer(writer)


async def test_small_message_waits_behind_bulk_data_fifo(echo_server: int) -> None:
    """A ping written right after a 100 kB burst arrives only after the burst serialized."""
    link = profile(4, 4, 10, 10)
    bulk, ping = os.urandom(100_000), b"ping"
    async with ShapingProxy(("127.0.0.1", echo_server), link) as proxy:
        reader, writer = await connect(proxy)
        loop = asyncio.get_running_loop()

        async def burst_then_ping() -> float:
            t0 = loop.time()
            writer.write(bulk + ping)
            echoed = await asyncio.wait_for(reader.readexactly(len(bulk) + len(ping)), GUARD_S)
            assert echoed[-4:] == ping and echoed[:-4] == bulk
            return loop.time() - t0

        # serialized up, then serialized down (the echo pipelines per quantum), + RTT
        expected = (len(bulk) + len(ping)) * 8 / link.uplink_bps + 1500 * 8 / link.downlink_bps + link.rtt_s
        await check_model(burst_then_ping, expected, "burst + ping echo")
        await close_writer(writer)


async def test_concurrent_connections_share_the_link(command_server: int) -> None:
    link = profile(10, 1000, 5, 5)
    nbytes = 250_000
    async with ShapingProxy(("127.0.0.1", command_server), link) as proxy:
        conns = [await connect(proxy) for _ in range(2)]

        async def both() -> float:
            return max(await asyncio.gather(*(timed_upload(r, w, nbytes) for r, w in conns)))

        expected = 2 * (nbytes + 9) * 8 / link.uplink_bps + link.rtt_s
        await check_model(both, expected, "two uploads sharing the uplink")
        for _, w in conns:
            await close_writer(w)


# -- traces ------------------------------------------------------------------------


async def test_trace_switch_mid_transfer_changes_rate(command_server: int) -> None:
    switch_at = 0.4
    trace = NetworkTrace([(0, 10, 100, 10), (switch_at, 2, 100, 10)], name="fast_then_slow")
    nbytes = 700_000
    expected = 0.0

    async def run_once() -> float:
        nonlocal expected
        async with ShapingProxy(("127.0.0.1", command_server), trace) as proxy:  # trace time restarts
            reader, writer = await connect(proxy)
            started = proxy.elapsed()
            assert started < switch_at / 2, "connection setup took too long for this test"
            measured = await timed_upload(reader, writer, nbytes)
            sent_fast = (switch_at - started) * 10 * MBIT / 8
            assert sent_fast < nbytes
            expected = (switch_at - started) + (nbytes + 9 - sent_fast) * 8 / (2 * MBIT) + 0.010
            await close_writer(writer)
            all_fast = (nbytes + 9) * 8 / (10 * MBIT) + 0.010
            assert measured > 2 * all_fast  # clearly slowed down, not just noise
            return measured

    await check_model(run_once, lambda: expected, "upload across a 10 -> 2 Mbit/s switch")


async def test_trace_latency_drop_keeps_bytes_in_order(echo_server: int) -> None:
    """When a trace cuts the latency, later data must not overtake earlier data."""
    trace = NetworkTrace([(0, 5, 5, 200), (0.05, 5, 5, 2)], name="latency_drop")
    async with ShapingProxy(("127.0.0.1", echo_server), trace) as proxy:
        reader, writer = await connect(proxy)
        # ~100 ms of serialization at 5 Mbit/s, so quanta enter the link on both
        # sides of the switch: the early ones get 100 ms latency, later ones 1 ms.
        sent = b"".join(bytes([i]) * 3000 for i in range(20))
        writer.write(sent)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), GUARD_S)  # until EOF
        assert got == sent
        await close_writer(writer)


async def test_network_can_be_swapped_on_a_running_proxy(echo_server: int) -> None:
    async with ShapingProxy(("127.0.0.1", echo_server), profile(10, 10, 50, 50)) as proxy:
        reader, writer = await connect(proxy)
        await check_model(lambda: min_rtt(reader, writer, b"x", n=2), 0.100, "before swap")
        proxy.network = profile(10, 10, 10, 10)
        await check_model(lambda: min_rtt(reader, writer, b"x"), 0.020, "after swap")
        await close_writer(writer)


# -- byte counts, integrity, many connections --------------------------------------


async def test_byte_counters_exact_and_data_intact(echo_server: int) -> None:
    sizes = [1, 1500, 1501, 65_536, 100_003]
    async with ShapingProxy(("127.0.0.1", echo_server), profile(200, 200, 1, 1)) as proxy:
        reader, writer = await connect(proxy)
        for n in sizes:
            data = os.urandom(n)
            writer.write(data)
            assert await asyncio.wait_for(reader.readexactly(n), GUARD_S) == data
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), GUARD_S) == b""
        await close_writer(writer)
        stats = proxy.stats()
        assert stats.bytes_up == stats.bytes_down == sum(sizes)
        assert stats.connections == 1
        assert stats.as_dict()["bytes_up"] == sum(sizes)


async def test_many_concurrent_connections(echo_server: int) -> None:
    n_conns, size = 25, 20_000
    async with ShapingProxy(("127.0.0.1", echo_server), profile(100, 100, 2, 2)) as proxy:

        async def one(i: int) -> None:
            reader, writer = await connect(proxy)
            data = bytes([i]) * size
            writer.write(data)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), GUARD_S) == data
            await close_writer(writer)

        await asyncio.gather(*(one(i) for i in range(n_conns)))
        stats = proxy.stats()
        assert stats.connections == n_conns
        assert stats.bytes_up == stats.bytes_down == n_conns * size


async def test_unshaped_passes_through_and_counts(echo_server: int) -> None:
    async with ShapingProxy(("127.0.0.1", echo_server), None) as proxy:
        reader, writer = await connect(proxy)
        data = os.urandom(300_000)
        writer.write(data)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), GUARD_S) == data
        await close_writer(writer)
        assert (proxy.stats().bytes_up, proxy.stats().bytes_down) == (len(data), len(data))


async def test_proxy_thread_keeps_time_while_the_callers_loop_is_busy(echo_server: int) -> None:
    """In its own thread the link's clock runs on while this loop blocks in "compute".

    The echo server shares this (blocked) loop, so the reply can only start when
    the loop is free again. With the proxy in its own thread the request already
    crossed the uplink during the block, and only the downlink latency remains;
    on a shared loop both latencies would come after the block.
    """
    link = profile(10, 10, 30, 30)
    block_s = 0.080
    with ProxyThread(("127.0.0.1", echo_server), link) as proxy:
        reader, writer = await connect(proxy)  # type: ignore[arg-type]
        await check_model(lambda: min_rtt(reader, writer, b"x", n=3), link.rtt_s, "RTT via ProxyThread")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        writer.write(b"y")
        await writer.drain()
        time.sleep(block_s)  # noqa: ASYNC251 - stands in for a GIL-releasing torch step, not synchronization
        assert await asyncio.wait_for(reader.readexactly(1), GUARD_S) == b"y"
        elapsed = loop.time() - t0
        assert elapsed < block_s + 1.5 * link.one_way_latency_down_s, f"{elapsed * 1e3:.1f} ms"
        await close_writer(writer)
    assert proxy.stats().bytes_up >= 4


# -- closing -----------------------------------------------------------------------


async def test_target_closing_closes_client() -> None:
    async def greet_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    server, port = await start_server(greet_and_close)
    async with server, ShapingProxy(("127.0.0.1", port), profile(10, 10, 10, 10)) as proxy:
        reader, writer = await connect(proxy)
        # data first, then EOF: the proxy flushes before it forwards the close
        assert await asyncio.wait_for(reader.read(), GUARD_S) == b"bye"
        assert reader.at_eof()
        await close_writer(writer)


async def test_client_half_close_still_gets_reply(echo_server: int) -> None:
    async with ShapingProxy(("127.0.0.1", echo_server), profile(10, 10, 10, 10)) as proxy:
        reader, writer = await connect(proxy)
        writer.write(b"question")
        writer.write_eof()  # we are done sending, but still want the answer
        assert await asyncio.wait_for(reader.read(), GUARD_S) == b"question"
        await close_writer(writer)


async def test_client_closing_closes_target() -> None:
    server_saw_eof = asyncio.get_running_loop().create_future()

    async def wait_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_saw_eof.set_result(await reader.read())
        writer.close()

    server, port = await start_server(wait_eof)
    async with server, ShapingProxy(("127.0.0.1", port), profile(10, 10, 10, 10)) as proxy:
        _reader, writer = await connect(proxy)
        writer.write(b"last words")
        await close_writer(writer)
        assert await asyncio.wait_for(server_saw_eof, GUARD_S) == b"last words"


async def test_unreachable_target_closes_client() -> None:
    server, port = await start_server(echo_handler)
    server.close()
    await server.wait_closed()  # the port is now (almost certainly) refused
    async with ShapingProxy(("127.0.0.1", port), profile(10, 10, 1, 1)) as proxy:
        reader, writer = await connect(proxy)
        assert await asyncio.wait_for(reader.read(), GUARD_S) == b""
        await close_writer(writer)


async def test_close_with_open_connections_does_not_hang(echo_server: int) -> None:
    proxy = await ShapingProxy(("127.0.0.1", echo_server), profile(1, 1, 50, 50)).start()
    conns = [await connect(proxy) for _ in range(3)]
    for _, w in conns:
        w.write(os.urandom(200_000))  # far more than the link carries in the test's time
    await asyncio.wait_for(proxy.close(), GUARD_S)
    for r, w in conns:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(10**9), GUARD_S)
        w.close()


# -- websockets through the proxy --------------------------------------------------


async def test_websockets_round_trip_through_proxy() -> None:
    from websockets.asyncio.client import connect as ws_connect
    from websockets.asyncio.server import serve

    max_size = 4 * 1024 * 1024

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    link = profile(20, 20, 10, 10)
    async with serve(echo, "127.0.0.1", 0, compression=None, max_size=max_size) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with ShapingProxy(("127.0.0.1", port), link) as proxy:
            loop = asyncio.get_running_loop()
            payload = os.urandom(300_000)
            async with ws_connect(
                f"ws://127.0.0.1:{proxy.port}", compression=None, max_size=max_size, open_timeout=GUARD_S
            ) as ws:

                async def echo_once() -> float:
                    t0 = loop.time()
                    await ws.send(payload)
                    assert await asyncio.wait_for(ws.recv(), GUARD_S) == payload
                    return loop.time() - t0

                # The server echoes only a whole message, so up and down serialization
                # add up (no pipelining), plus the RTT; framing adds a few bytes.
                expected = len(payload) * 8 / link.uplink_bps + len(payload) * 8 / link.downlink_bps + link.rtt_s
                await check_model(echo_once, expected, "websocket echo")
            stats = proxy.stats()
            assert stats.bytes_up >= len(payload) and stats.bytes_down >= len(payload)


# -- command line ------------------------------------------------------------------


def test_cli_help_and_bad_network(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--network" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--target", "127.0.0.1:1", "--network", "lte"])
    assert "choose one of: wifi, 5g, 4g, iot" in capsys.readouterr().err
    args = build_parser().parse_args(["--target", "127.0.0.1:9", "--network", "iot"])
    assert args.network is PROFILES["iot"] and args.target == ("127.0.0.1", 9)
