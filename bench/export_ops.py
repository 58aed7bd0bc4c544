"""Where an exported head's training step spends its time, per ExecuTorch kernel.

Two views, for whoever optimizes the export next (issue 6 §4):

* ``--model M --point P``: exports the head, runs its ``forward_backward`` method
  with ETDump on, and prints time per operator kind plus the slowest single calls
  with their operand shapes (events paired with the program's kernel calls);
* ``--kernels``: the single-kernel comparisons behind ``export/graph_passes.py`` and
  ``export/layout.py`` (``linear`` vs transpose + ``mm``, strided taps by phase vs
  by strided slices, ``pixel_shuffle`` vs stacks), each pair timed round-robin.

    python bench/export_ops.py --model mobilenetv3_large --point 3
    python bench/export_ops.py --kernels
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load(data_or_path, **kw):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(data_or_path, **kw)


def profile_ops(model: str, point: int, batch: int, top: int) -> None:
    from executorch.devtools import Inspector
    from executorch.exir._serialize._program import deserialize_pte_binary

    from edge_sdk import zoo
    from edge_sdk.runtime.program import init_buffers
    from export.api import export_head, write_manifest

    spec = zoo.build(model)
    out = Path(tempfile.mkdtemp())
    entry = export_head(
        spec.model.head(point),
        spec.input_shape,
        point=point,
        batch_size=batch,
        out_dir=out,
        fmt="executorch",
        name_map=spec.model.head_name_map(point),
    )
    write_manifest(out, [entry], model=spec.name, config_hash=spec.config_hash, fmt="executorch", batch_size=batch)
    pte = out / f"head_p{point}.pte"
    program = _load(pte, enable_etdump=True)
    method = program.load_method("forward_backward")
    buffers = init_buffers(entry, spec.model.state_dict())
    args = [
        torch.randn(entry["input"]["shape"]),
        torch.randn(entry["features"]["shape"]),
        *[buffers[b["name"]] for b in entry["buffers"]],
    ]
    method.execute(args)  # warm-up
    t0 = time.perf_counter()
    method.execute(args)
    print(f"{model} p={point} batch {batch}: forward_backward {1e3 * (time.perf_counter() - t0):.1f} ms")
    program.write_etdump_result_to_file(str(out / "etdump.etdp"), str(out / "debug.bin"))

    # kernel calls of the joint method, in order, with their tensor operand shapes
    plan_bytes = deserialize_pte_binary(pte.read_bytes())
    plan = next(p for p in getattr(plan_bytes, "program", plan_bytes).execution_plan if p.name == "forward_backward")
    calls = []
    for ins in plan.chains[0].instructions:
        a = ins.instr_args
        if type(a).__name__ == "KernelCall":
            shapes = [tuple(plan.values[i].val.sizes) for i in a.args if type(plan.values[i].val).__name__ == "Tensor"]
            calls.append((plan.operators[a.op_index].name.split("::")[-1], shapes))
    events = [
        ev
        for blk in Inspector(etdump_path=str(out / "etdump.etdp")).event_blocks
        for ev in blk.events
        if ev.name.startswith("native_call") and ev.perf_data is not None
    ]
    events = events[-len(calls) :]  # the last execution
    rows = [(statistics.mean(ev.perf_data.raw), name, shapes) for (name, shapes), ev in zip(calls, events)]
    per_op: dict[str, list[float]] = collections.defaultdict(list)
    for ms, name, _ in rows:
        per_op[name].append(ms)
    print("\nms per operator kind (calls):")
    for name, ms in sorted(per_op.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {name:28s} {sum(ms):8.2f}  ({len(ms)})")
    print(f"\nslowest {top} calls:")
    for ms, name, shapes in sorted(rows, key=lambda r: -r[0])[:top]:
        print(f"  {ms:7.2f} ms  {name:24s} {shapes}")


def _lowered(fn, args, keep=()):
    """``fn`` as a one-method ExecuTorch program, ``keep`` ops preserved."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.export import default_decompositions

    class M(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    table = default_decompositions()
    for op in keep:
        table.pop(op, None)
    ep = torch.export.export(M(), args, strict=False).run_decompositions(table)
    cfg = EdgeCompileConfig(_check_ir_validity=False, preserve_ops=list(keep))
    buf = io.BytesIO()
    to_edge(ep, compile_config=cfg).to_executorch().write_to_file(buf)
    program = _load(buf.getvalue())
    method = program.load_method("forward")
    method._keep_program_alive = program  # the method reads the program's memory
    return method


def compare_kernels(repeats: int) -> dict:
    from export.kernels import _tap_slices

    aten = torch.ops.aten
    dy, x = torch.randn(64, 32768), torch.randn(16, 32768)
    xp, w9 = torch.randn(64, 32, 34, 34), torch.randn(64, 1, 9)
    phases = [torch.randn(64, 32, 17, 17) for _ in range(4)]

    def taps(strided: bool):
        def f(x, w):
            if strided:  # one strided slice per tap
                t = [x[:, :, i : i + 31 : 2, j : j + 31 : 2] for i in range(3) for j in range(3)]
            else:
                t = _tap_slices(x, (3, 3), (2, 2), (1, 1), (16, 16))
            return torch.bmm(w, torch.stack(t, 1).reshape(64, 9, -1))

        return f

    def stacks(a, b, c, d):
        r0 = torch.stack([a, b], -1).reshape(64, 32, 17, 34)
        r1 = torch.stack([c, d], -1).reshape(64, 32, 17, 34)
        return torch.stack([r0, r1], -2).reshape(64, 32, 34, 34)

    def shuffle(a, b, c, d):
        s = torch.stack([a, b, c, d], 2).reshape(2048, 4, 17, 17)
        return torch.nn.functional.pixel_shuffle(s, 2).reshape(64, 32, 34, 34)

    pairs = {
        "a @ b.T: linear vs permute_copy + mm": (
            (lambda a, b: torch.nn.functional.linear(a, b), (dy, x), (aten.linear.default,)),
            (lambda a, b: a @ b.t(), (dy, x), ()),
        ),
        "stride-2 3x3 taps + bmm: by phase vs strided slices": ((taps(False), (xp, w9), ()), (taps(True), (xp, w9), ())),
        "interleave 4 phases: pixel_shuffle vs stacks": (
            (shuffle, tuple(phases), (aten.pixel_shuffle.default,)),
            (stacks, tuple(phases), ()),
        ),
    }
    report = {}
    for name, ((f_new, a_new, k_new), (f_old, a_old, k_old)) in pairs.items():
        new, old = _lowered(f_new, a_new, k_new), _lowered(f_old, a_old, k_old)
        torch.testing.assert_close(new.execute(list(a_new))[0], old.execute(list(a_old))[0], rtol=1e-4, atol=1e-3)
        times: dict[str, list[float]] = {"new": [], "old": []}
        for _ in range(repeats):  # round-robin
            for key, m, a in (("new", new, a_new), ("old", old, a_old)):
                t0 = time.perf_counter()
                m.execute(list(a))
                times[key].append(1e3 * (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in times.items()}
        report[name] = med
        print(f"  {name:55s} {med['new']:7.2f} vs {med['old']:7.2f} ms ({med['old'] / med['new']:.2f}x)")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenetv3_large")
    ap.add_argument("--point", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--top", type=int, default=25, help="how many of the slowest calls to list")
    ap.add_argument("--kernels", action="store_true", help="only the single-kernel comparisons")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", type=Path, help="write the kernel comparison here")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if args.kernels:
        print("single kernels in ExecuTorch (new vs old, median, round-robin):")
        report = compare_kernels(args.repeats)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    else:
        profile_ops(args.model, args.point, args.batch_size, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
