"""Live fuzz campaign against one ``cloud_backend serve`` process, then a normal run on it.

Sends at least ``--frames`` fuzzed frames (random bytes, bit-flipped and truncated
valid frames, absurd field values, text, frames in the wrong direction, oversize
frames, and honest steps mixed in) over ``--connections`` concurrent
connections, some authenticated (a valid Hello first), some not. Every fuzzed
frame must be *answered*: before Hello each frame gets a reply (``Error`` or
``HelloAck``) or an explicit close; after Hello each frame is followed by a
``Context`` request with a unique step id, whose answer must arrive. Then, on
the same server process:

* 8 honest devices at once must all be admitted (``--max-sessions 8``): no slot leaked;
* a normal training run (digits CNN, cut 4, K=0, fp32, fixed seed: deterministic)
  must reach exactly the test accuracy of the same run on a fresh server;
* server RSS after the campaign must stay within 1.2x of before it.

Writes ``bench/results/fuzz_live.json``. About 3-5 minutes on 2 cores::

    python bench/fuzz_live.py [--frames 100000] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_sdk import zoo
from edge_sdk.client import EdgeClient, run_training
from edge_sdk.hello import hello_frame
from edge_sdk.optim import OptimizerConfig
from edge_sdk.training import TrainConfig
from schemas import codecs
from schemas import frames as fr
from schemas.errors import ErrorCode, WireError

MAX_FRAME = 1 << 20  # the server runs with --max-frame-bytes 1 MiB so oversize frames stay cheap
PRE_AUTH_MAX = 64 * 1024
PROBE_BASE = 1 << 50  # probe step ids; the fuzzer never uses this range
BATCH = 8
REPLY_TIMEOUT_S = 30.0


# ----------------------------------------------------------------- server
class Server:
    """``python -m cloud_backend serve`` on a free loopback port, stderr to a file."""

    def __init__(self, extra: list[str]) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - lives as long as the server
        cmd = [
            sys.executable,
            "-m",
            "cloud_backend",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--threads",
            "1",
            "--max-sessions",
            "8",
            "--max-frame-bytes",
            str(MAX_FRAME),
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
        line = self.proc.stdout.readline()
        m = re.search(r":(\d+)\s*$", line)
        if not m:
            raise SystemExit(f"server did not start: {line!r}\n{Path(self.log.name).read_text()[-2000:]}")
        self.port = int(m.group(1))

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return Path(self.log.name).read_text()


# ------------------------------------------------------------------ fuzzer
class Fuzzer:
    """Makes one fuzzed frame at a time; knows the session's cut so honest steps stay honest."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.spec = zoo.build("digits_cnn", seed=0)
        self.model = self.spec.model
        self.points = [p for p in self.model.cut_points if 0 < p < self.model.num_blocks]
        self.names = [n for n, _ in self.model.named_parameters()] + [n for n, _ in self.model.named_buffers()]
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(BATCH, 1, 8, 8, generator=gen)
        self.y = torch.randint(0, 10, (BATCH,), generator=gen)
        with torch.no_grad():
            self.feats = {p: self.model.head(p)(self.x) for p in self.points}
        self.valid = {p: [self.encode(self.features(p, s)) for s in range(4)] for p in self.points}

    @staticmethod
    def encode(frame: object) -> bytes:
        return fr.encode(fr.Envelope(frame=frame))

    def hello(self, point: int, **over) -> fr.Hello:
        hello = hello_frame(self.spec, point=point, codec="int8", staleness=2, optimizer=OptimizerConfig(), batch_size=BATCH)
        return dataclasses.replace(hello, **over)

    def features(self, point: int, step: int, *, train: bool = True, codec=codecs.Codec.INT8_TENSOR, **over) -> fr.Features:
        tf, _ = codecs.encode_tensor(self.feats[point], codec)
        frame = fr.Features(
            step=step,
            epoch=0,
            point=point,
            tensor=tf,
            labels=codecs.tensor_frame_from_tensor(self.y),
            train=train,
            grad_codec="int8",
        )
        return dataclasses.replace(frame, **over)

    def _absurd_int(self) -> int:
        return self.rng.choice([-1, 0, 1, 2**31 - 1, -(2**31), 2**62, self.rng.randrange(-1000, 1000)])

    def _random_tensor(self) -> codecs.TensorFrame:
        r = self.rng.random()
        if r < 0.2:  # a top-k frame claiming a huge tensor
            n = self.rng.choice([1 << 20, 1 << 24, 1 << 26])
            return codecs.TensorFrame(
                dtype=codecs.DType.F32,
                shape=(n,),
                codec=codecs.Codec.TOPK,
                payload=np.ones(1, np.float32),
                k=1,
                indices=np.zeros(1, np.uint32),
            )
        shape = tuple(self.rng.randrange(0, 9) for _ in range(self.rng.randrange(0, 5)))
        t = torch.randn(shape) * 10 ** self.rng.uniform(-3, 38)
        if r < 0.4 and t.numel():
            t.view(-1)[0] = self.rng.choice([float("nan"), float("inf"), -float("inf")])
            return codecs.tensor_frame_from_tensor(t)
        codec = self.rng.choice(list(codecs.Codec)) if r < 0.8 else codecs.Codec.NONE
        try:
            tf, _ = codecs.encode_tensor(t, codec)
        except ValueError:
            tf = codecs.tensor_frame_from_tensor(t)
        return tf

    def _labels(self) -> codecs.TensorFrame | None:
        return self.rng.choice(
            [
                None,
                codecs.tensor_frame_from_tensor(torch.full((BATCH,), self.rng.choice([-1, 10, 2**40]))),
                codecs.tensor_frame_from_tensor(torch.tensor(3)),
                codecs.tensor_frame_from_tensor(torch.zeros(BATCH)),
                codecs.tensor_frame_from_tensor(torch.zeros(BATCH - 1, dtype=torch.long)),
                codecs.tensor_frame_from_tensor(self.y),
            ]
        )

    def absurd(self, point: int, step: int) -> object:
        rng = self.rng
        kind = rng.randrange(10)
        if kind == 0:
            return self.features(point, step, labels=self._labels())
        if kind == 1:
            return self.features(point, step, tensor=self._random_tensor())
        if kind == 2:
            return self.features(
                point,
                rng.choice([step, self._absurd_int()]),
                epoch=self._absurd_int(),
                point=rng.choice([point, self._absurd_int()]),
                grad_codec=rng.choice(["", "bogus", "topk", "int4", "\0"]),
                train=rng.random() < 0.5,
            )
        if kind == 3:
            name = rng.choice(self.names + ["blocks.99.x", "", "blocks.0", "../etc/passwd", "blocks.0.0.weight/exp_avg"])
            return fr.Weights(
                step=step,
                name=name,
                kind=rng.choice(["param", "buffer", "optim"]),
                tensor=self._random_tensor(),
                chunk=self._absurd_int(),
                chunks=self._absurd_int(),
                last=rng.random() < 0.5,
            )
        if kind == 4:
            return fr.Repartition(
                step=step,
                point=rng.choice(self.points + [0, self.model.num_blocks, self._absurd_int()]),
                codec=rng.choice(["int8", "bogus"]),
                staleness=self._absurd_int(),
            )
        if kind == 5:
            return fr.EpochEnd(epoch=self._absurd_int(), step=self._absurd_int(), train=rng.random() < 0.5)
        if kind == 6:
            return fr.Context(
                step=self._absurd_int(),
                uplink_bps=rng.choice([float("nan"), 1e300, -1.0]),
                cloud_block_ms=[rng.random()] * rng.randrange(0, 50),
                request=rng.random() < 0.5,
            )
        if kind == 7:  # frames that only the cloud sends
            return rng.choice(
                [
                    fr.HelloAck(session=1, accepted=True),
                    fr.Gradients(step=step, tensor=self._random_tensor()),
                    fr.RepartitionAck(step=step, point=1, accepted=True),
                    fr.EvalResult(epoch=0, count=-5),
                    fr.Error(code=ErrorCode.INTERNAL, message="x" * rng.randrange(0, 5000)),
                ]
            )
        if kind == 8:
            return self.hello(
                point,
                **rng.choice(
                    [
                        {"model_hash": "0" * 64},
                        {"optimizer_json": '{"momentum": "x"}'},
                        {"optimizer_json": '{"schedule": "step", "step_every": 0}'},
                        {"config_json": '{"width": 100000}'},
                        {"config_json": "[1]"},
                        {"model": "resnet50"},
                        {"batch_size": 10**9},
                        {"staleness": -3},
                        {"codec": "bogus"},
                        {"runtime": "x"},
                        {"point": self._absurd_int()},
                        {"seed": -1},
                    ]
                ),
            )
        return self.features(point, step, train=False, labels=self._labels())

    def mutate(self, data: bytes) -> bytes:
        b = bytearray(data)
        r = self.rng.random()
        if r < 0.4:
            for _ in range(self.rng.randrange(1, 8)):
                i = self.rng.randrange(len(b))
                b[i] ^= 1 << self.rng.randrange(8)
        elif r < 0.7:
            b = b[: self.rng.randrange(len(b))]
        else:
            i = self.rng.randrange(len(b))
            b[i : i + 4] = self.rng.randbytes(4)
        return bytes(b)

    def next(self, authed: bool, point: int, step: int) -> tuple[str, bytes | str]:
        """(category, message) of the next fuzzed frame."""
        r = self.rng.random()
        if r < 0.0004:
            return "oversize", b"\0" * ((MAX_FRAME if authed else PRE_AUTH_MAX) + 1)
        if r < 0.002:
            return "bye", self.encode(fr.Bye(reason="fuzz"))
        if r < 0.05:
            return "text", "x" * self.rng.randrange(0, 300)
        if r < 0.20:
            return "random", self.rng.randbytes(self.rng.randrange(0, 2000))
        if r < 0.45:
            return "mutated", self.mutate(self.rng.choice(self.valid[self.rng.choice(self.points)]))
        if r < 0.80 or not authed:
            try:
                return "absurd", self.encode(self.absurd(point, step))
            except (ValueError, OverflowError, TypeError, WireError):  # our encoder refuses some absurd frames
                return "random", self.rng.randbytes(64)
        return "valid", self.encode(self.features(point, step, train=self.rng.random() < 0.8))


# ---------------------------------------------------------------- campaign
@dataclasses.dataclass
class Tally:
    sent: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    replies: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    closes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unanswered: int = 0
    internal: int = 0
    connections: int = 0
    probes: int = 0


async def _read_until(ws, done, tally: Tally, state: dict) -> None:
    while True:
        frame = fr.decode(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_S)).frame
        tally.replies[type(frame).__name__] += 1
        if isinstance(frame, fr.Error) and frame.code == ErrorCode.INTERNAL:
            tally.internal += 1
        if isinstance(frame, fr.RepartitionAck):
            state["point"] = frame.point
        if done(frame) is not False:
            return


async def fuzz_connection(port: int, quota: int, seed: int, tally: Tally, bar: tqdm) -> None:
    rng = random.Random(seed)
    fuzzer = Fuzzer(rng)
    sent = 0
    while sent < quota:
        tally.connections += 1
        state = {"point": rng.choice(fuzzer.points)}
        try:
            ws = await connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None, max_size=None)
        except (OSError, InvalidHandshake) as exc:
            raise SystemExit(f"cannot connect to the fuzzed server: {exc}") from None
        authed = False
        step = 0
        try:
            if rng.random() < 0.75:
                await ws.send(fuzzer.encode(fuzzer.hello(state["point"])))
                await _read_until(ws, lambda f: isinstance(f, fr.HelloAck), tally, state)
                authed = True
            while sent < quota:
                category, message = fuzzer.next(authed, state["point"], step)
                step += 1
                await ws.send(message)
                sent += 1
                bar.update(1)
                tally.sent[category] += 1
                try:
                    if authed:
                        marker = PROBE_BASE + tally.probes
                        tally.probes += 1
                        await ws.send(fuzzer.encode(fr.Context(step=marker, request=True)))
                        await _read_until(ws, lambda f, m=marker: isinstance(f, fr.Context) and f.step == m, tally, state)
                    else:
                        first: list[object] = []
                        await _read_until(ws, first.append, tally, state)  # any one reply answers it
                        authed = isinstance(first[0], fr.HelloAck)
                except TimeoutError:
                    tally.unanswered += 1
                    break
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            tally.closes[str(code)] += 1
        finally:
            await ws.close()


async def campaign(port: int, frames: int, connections: int, seed: int) -> Tally:
    tally = Tally()
    per = -(-frames // connections)
    with tqdm(total=per * connections, desc="fuzzing", unit="frame", smoothing=0.05) as bar:
        await asyncio.gather(*(fuzz_connection(port, per, seed * 1000 + i, tally, bar) for i in range(connections)))
    return tally


async def honest_fleet(port: int, n: int) -> list[int]:
    cfg = TrainConfig(epochs=1, max_steps_per_epoch=5, batch_size=16, point=2, codec="int8", staleness=1, evaluate=False)
    clients = [EdgeClient(f"ws://127.0.0.1:{port}", dataclasses.replace(cfg, seed=i)) for i in range(n)]
    results = await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 300)
    return [r.steps for r in results]


def normal_run(port: int) -> dict:
    cfg = TrainConfig(epochs=3, batch_size=32, point=4, codec="fp32", staleness=0, seed=0)
    r = run_training(f"ws://127.0.0.1:{port}", cfg)
    return {"test_accuracy": r.test_accuracy, "steps": r.steps, "train_loss": r.train_loss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100_000, help="fuzzed frames in all (default: %(default)s)")
    ap.add_argument("--connections", type=int, default=8, help="concurrent fuzzing connections (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="fuzzer seed (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz_live.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    server = Server([])
    try:
        normal_run_warm = asyncio.run(honest_fleet(server.port, 1))  # torch and the model loaded, one session served
        rss_before = server.rss()
        t0 = time.perf_counter()
        tally = asyncio.run(campaign(server.port, args.frames, args.connections, args.seed))
        campaign_s = time.perf_counter() - t0
        alive_after_campaign = server.proc.poll() is None
        rss_after = server.rss()
        fleet = asyncio.run(honest_fleet(server.port, 8))
        fuzzed = normal_run(server.port)
        alive = server.proc.poll() is None
    finally:
        log = server.stop()
    fresh_server = Server([])
    try:
        fresh = normal_run(fresh_server.port)
    finally:
        fresh_server.stop()

    crashes = int(not (alive_after_campaign and alive)) + log.count("Traceback")
    internal_lines = [line for line in log.splitlines() if "internal error" in line]
    result = {
        "frames": sum(tally.sent.values()),
        "connections": args.connections,
        "connections_opened": tally.connections,
        "campaign_s": round(campaign_s, 1),
        "frames_per_s": round(sum(tally.sent.values()) / campaign_s, 1),
        "sent_by_kind": dict(tally.sent),
        "replies_by_frame": dict(tally.replies),
        "closes_by_code": dict(tally.closes),
        "crashes": crashes,
        "unanswered": tally.unanswered,
        "internal_errors": tally.internal,
        "internal_error_log": internal_lines[:20],
        "leaked_slots": 8 - sum(1 for s in fleet if s == 5),
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_ratio": round(rss_after / rss_before, 3),
        "normal_run_after_fuzz": fuzzed,
        "normal_run_fresh_server": fresh,
        "accuracy_equal": fuzzed["test_accuracy"] == fresh["test_accuracy"],
        "warm_up_steps": normal_run_warm,
    }
    result["goals_met"] = (
        result["frames"] >= 100_000
        and crashes == 0
        and tally.unanswered == 0
        and tally.internal == 0
        and result["leaked_slots"] == 0
        and result["rss_ratio"] <= 1.2
        and result["accuracy_equal"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['frames']} frames over {args.connections} connections ({tally.connections} opened) in {campaign_s:.0f} s: "
        f"crashes {crashes}, unanswered {tally.unanswered}, INTERNAL {tally.internal}, leaked slots {result['leaked_slots']}"
    )
    print(
        f"server RSS {result['rss_before_mib']} -> {result['rss_after_mib']} MiB ({result['rss_ratio']}x); "
        f"accuracy after fuzzing {fuzzed['test_accuracy']:.4f} vs fresh server {fresh['test_accuracy']:.4f}"
    )
    print(f"goals met: {result['goals_met']}; wrote {args.out}")
    return 0 if result["goals_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
