"""Named link profiles, CSV traces and ``parse_network`` (no sockets, no timing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.emulation.network import (
    PROFILES,
    TRACES_DIR,
    LinkProfile,
    NetworkTrace,
    TraceFormatError,
    parse_network,
)

MBIT = 1_000_000


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- profiles ------------------------------------------------------------------------


def test_named_profiles_exist_with_sources() -> None:
    assert set(PROFILES) == {"wifi", "5g", "4g", "iot"}
    for name, p in PROFILES.items():
        assert p.name == name
        assert len(p.source) > 40, f"{name} must say where its figures come from"
        assert 0 < p.uplink_bps <= p.downlink_bps
        assert 0 < p.one_way_latency_up_s < 0.5


def test_profiles_are_ordered_like_the_real_links() -> None:
    # the decision engine relies on iot being the slow, far link and wifi/5g fast
    up = {n: p.uplink_bps for n, p in PROFILES.items()}
    rtt = {n: p.rtt_s for n, p in PROFILES.items()}
    assert up["iot"] < up["4g"] < up["5g"] < up["wifi"]
    assert rtt["wifi"] < rtt["5g"] < rtt["4g"] < rtt["iot"]
    assert PROFILES["iot"].uplink_bps <= 1 * MBIT


def test_profile_validation_and_at() -> None:
    p = LinkProfile("x", 1e6, 2e6, 0.01, 0.02)
    assert p.at(123.0) is p
    assert p.rtt_s == pytest.approx(0.03)
    with pytest.raises(ValueError, match="uplink_bps"):
        LinkProfile("x", 0, 1e6, 0, 0)
    with pytest.raises(ValueError, match="one_way_latency_down_s"):
        LinkProfile("x", 1e6, 1e6, 0, -1)


# -- parse_network ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["wifi", "5g", "4g", "iot", " WiFi ", "IOT"])
def test_parse_named(spec: str) -> None:
    assert parse_network(spec) is PROFILES[spec.strip().lower()]


def test_parse_none_means_unshaped() -> None:
    assert parse_network("none") is None


def test_parse_unknown_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown network 'lte'; choose one of: wifi, 5g, 4g, iot, trace:PATH, none"):
        parse_network("lte")


def test_parse_trace_path_and_shipped_name(tmp_path: Path) -> None:
    path = write(tmp_path, "time_s,up_mbps,down_mbps,rtt_ms\n0,1,2,30\n")
    trace = parse_network(f"trace:{path}")
    assert isinstance(trace, NetworkTrace) and trace.at(0).uplink_bps == 1 * MBIT
    # shipped traces resolve by bare name, with or without .csv, from any directory
    assert isinstance(parse_network("trace:wifi_to_iot"), NetworkTrace)
    assert isinstance(parse_network("trace:wifi_to_iot.csv"), NetworkTrace)


def test_parse_trace_missing_file_names_shipped_traces() -> None:
    with pytest.raises(TraceFormatError, match=r"not found \(shipped traces: .*wifi_to_iot\.csv"):
        parse_network("trace:/no/such/file.csv")
    with pytest.raises(ValueError, match="needs a file"):
        parse_network("trace:")


# -- traces ----------------------------------------------------------------------------


def test_trace_is_piecewise_constant(tmp_path: Path) -> None:
    text = """# comment line
time_s,up_mbps,down_mbps,rtt_ms

0, 10, 20, 40
# another comment
5.5,1,2,100
"""
    trace = NetworkTrace.from_csv(write(tmp_path, text))
    first, second = trace.at(0), trace.at(5.5)
    assert (first.uplink_bps, first.downlink_bps) == (10 * MBIT, 20 * MBIT)
    assert first.one_way_latency_up_s == first.one_way_latency_down_s == pytest.approx(0.020)
    assert trace.at(5.49) is first and trace.at(-1) is first
    assert second.uplink_bps == 1 * MBIT and second.rtt_s == pytest.approx(0.100)
    assert trace.at(1e6) is second  # the last row holds
    assert trace.duration_s == 5.5 and trace.name == "t"


def test_shipped_traces_load() -> None:
    files = sorted(TRACES_DIR.glob("*.csv"))
    assert len(files) >= 2
    for path in files:
        assert NetworkTrace.from_csv(path).at(0).uplink_bps > 0
    wifi_to_iot = NetworkTrace.from_csv(TRACES_DIR / "wifi_to_iot.csv")
    assert wifi_to_iot.at(19.9).uplink_bps == PROFILES["wifi"].uplink_bps
    assert wifi_to_iot.at(20).uplink_bps == PROFILES["iot"].uplink_bps
    assert wifi_to_iot.at(20).rtt_s == pytest.approx(PROFILES["iot"].rtt_s)


HEADER = "time_s,up_mbps,down_mbps,rtt_ms\n"


@pytest.mark.parametrize(
    "body, message",
    [
        ("time,up,down,rtt\n0,1,1,1\n", r"t\.csv:1: expected header line"),
        (HEADER + "0,1,1\n", r"t\.csv:2: expected 4 comma-separated values .* got 3"),
        (HEADER + "0,1,1,1\n1,fast,1,1\n", r"t\.csv:3: up_mbps is not a number: 'fast'"),
        (HEADER + "0,1,1,nan\n", r"t\.csv:2: rtt_ms must be finite"),
        (HEADER + "# c\n0,1,1,1\n3,1,1,1\n2,1,1,1\n", r"t\.csv:5: time_s must strictly increase \(2 after 3\)"),
        (HEADER + "0,1,1,1\n0,1,1,1\n", r"t\.csv:3: time_s must strictly increase"),
        (HEADER + "1,1,1,1\n", r"t\.csv:2: the first row must be at time_s 0"),
        (HEADER + "-1,1,1,1\n", r"t\.csv:2: time_s must be >= 0"),
        (HEADER + "0,0,1,1\n", r"t\.csv:2: up_mbps and down_mbps must be > 0"),
        (HEADER + "0,1,1,-5\n", r"t\.csv:2: rtt_ms must be >= 0"),
        ("# only a comment\n", r"t\.csv: empty trace"),
        (HEADER, r"t\.csv: trace has a header but no rows"),
    ],
)
def test_malformed_trace_errors_name_file_and_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(TraceFormatError, match=message):
        NetworkTrace.from_csv(write(tmp_path, body))


def test_unreadable_trace(tmp_path: Path) -> None:
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraceFormatError, match="cannot read trace file"):
        NetworkTrace.from_csv(path)
    with pytest.raises(TraceFormatError, match="trace file not found"):
        NetworkTrace.from_csv(tmp_path / "missing.csv")


def test_in_memory_trace_validation() -> None:
    with pytest.raises(ValueError, match="first row must be at time 0"):
        NetworkTrace([(1, 1, 1, 1)])
    with pytest.raises(ValueError, match="strictly increase"):
        NetworkTrace([(0, 1, 1, 1), (0, 1, 1, 1)])
    with pytest.raises(ValueError, match="no rows"):
        NetworkTrace([])


def test_package_import_stays_light() -> None:
    import subprocess
    import sys

    code = "import sys, edge_sdk.emulation; print('torch' in sys.modules, 'edge_sdk.emulation.proxy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
