"""bench/wire.py stays runnable: a tiny run writes its JSON with every codec and the baseline."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "wire.py"


def test_wire_bench_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_wire", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "wire.json"
    assert mod.main(["--shape", "4,8,4,4", "--reps", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["codecs"]) == {"fp32", "fp16", "bf16", "int8", "int8c", "int4", "topk"}
    assert res["codecs"]["fp32"]["max_rel_err"] == 0.0
    assert 0 < res["codecs"]["int8c"]["max_rel_err"] < 0.01
    assert res["codecs"]["int4"]["frame_bytes"] < res["codecs"]["int8"]["frame_bytes"] < res["codecs"]["fp32"]["frame_bytes"]
    assert res["baseline"]["send_recv_s"] > 0 and res["speedup_vs_baseline"] > 0
    assert "int8c" in capsys.readouterr().out
