"""The schema as the truth: committed code is fresh, and independent readers agree with ours.

Two independent decoders check `schemas.frames`: the flatc-generated Python
classes (committed in schemas/_generated) and ``flatc --json`` itself.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas import regen
from schemas.codecs import Codec, DType, TensorFrame, encode_tensor, tensor_frame_from_array
from schemas.errors import ErrorCode
from schemas.frames import FRAME_TYPES, WEIGHT_KINDS, Envelope, Features, encode
from schemas.samples import sample_envelopes

# plus one frame whose payload is big enough to take the encoder's append path
_BIG = Envelope(
    Features(
        step=9,
        epoch=1,
        point=2,
        tensor=encode_tensor(torch.linspace(-3, 3, 700).reshape(7, 10, 10), "fp32")[0],
        labels=tensor_frame_from_array(np.arange(7, dtype=np.int64)),
        grad_codec="int8",
    ),
    seq=5,
    sent_ns=6,
)
SAMPLES = sample_envelopes() + [_BIG]


@pytest.fixture(scope="module")
def flatc() -> Path:
    try:
        path = regen.find_flatc()
        version = regen.flatc_version(path)
    except (FileNotFoundError, subprocess.CalledProcessError, OSError) as e:
        pytest.fail(f"pinned flatc unavailable: {e}")
    assert version == regen.PINNED_FLATC_VERSION, f"{path} is flatc {version}"
    return path


@pytest.fixture(scope="module")
def gen():
    """The committed generated package `splitreplay.wire`, imported from schemas/_generated."""
    root = str(regen.GENERATED)
    sys.path.insert(0, root)
    try:
        yield lambda name: getattr(importlib.import_module(f"splitreplay.wire.{name}"), name)
    finally:
        sys.path.remove(root)
        for mod in [m for m in sys.modules if m == "splitreplay" or m.startswith("splitreplay.")]:
            del sys.modules[mod]


def test_committed_generated_code_is_fresh(tmp_path, flatc):
    files = regen.generate(tmp_path, flatc)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in files}
    committed = {p.relative_to(regen.GENERATED): p.read_text() for p in regen.GENERATED.rglob("*.py")}
    assert sorted(fresh) == sorted(committed), "file set differs: run `python -m schemas.regen`"
    stale = [str(p) for p in fresh if fresh[p] != committed[p]]
    assert not stale, f"stale generated code {stale}: run `python -m schemas.regen`"


def test_schema_states_evolution_rules_and_identifier():
    text = regen.SCHEMA.read_text()
    head = text[: text.index("namespace")]
    assert "SCHEMA EVOLUTION RULES" in head and "deprecated" in head and "Append" in head
    assert 'file_identifier "SRW1";' in text


@pytest.mark.parametrize("enum_name,ours", [("ErrorCode", ErrorCode), ("Codec", Codec), ("DType", DType)])
def test_python_enums_mirror_the_schema(gen, enum_name, ours):
    theirs = gen(enum_name)
    values = {k: v for k, v in vars(theirs).items() if not k.startswith("_")}
    assert values == {m.name: m.value for m in ours}


def test_frame_union_and_weight_kinds_mirror_the_schema(gen):
    frame = {k: v for k, v in vars(gen("Frame")).items() if not k.startswith("_")}
    assert frame == {"NONE": 0, **{cls.__name__: i + 1 for i, cls in enumerate(FRAME_TYPES)}}
    kinds = {k: v for k, v in vars(gen("WeightKind")).items() if not k.startswith("_")}
    assert kinds == {k.upper(): i for i, k in enumerate(WEIGHT_KINDS)}


def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))


def _check_tensor(gt, tf: TensorFrame) -> None:
    assert gt.Dtype() == tf.dtype and gt.Codec() == tf.codec and gt.OrigDtype() == tf.orig_dtype
    assert gt.ShapeAsNumpy().tolist() == list(tf.shape) if tf.shape else gt.ShapeLength() == 0
    assert gt.PayloadAsNumpy().tobytes() == tf.payload.tobytes()
    assert gt.K() == tf.k and gt.Axis() == tf.axis
    for name in ("scales", "zero_points", "indices"):
        arr = getattr(tf, name)
        if arr is None:
            assert getattr(gt, f"{_camel(name)}IsNone")()
        else:
            np.testing.assert_array_equal(getattr(gt, f"{_camel(name)}AsNumpy")(), arr)


@pytest.mark.parametrize("env", SAMPLES, ids=lambda e: type(e.frame).__name__)
def test_generated_reader_agrees_with_encoder(gen, env):
    buf = encode(env)
    Envelope = gen("Envelope")
    assert Envelope.EnvelopeBufferHasIdentifier(buf, 0)
    root = Envelope.GetRootAs(buf, 0)
    assert (root.VersionMajor(), root.VersionMinor()) == tuple(env.version)
    assert (root.Session(), root.Seq(), root.SentNs()) == (env.session, env.seq, env.sent_ns)
    cls = type(env.frame)
    assert root.FrameType() == FRAME_TYPES.index(cls) + 1
    table = root.Frame()
    obj = gen(cls.__name__)()
    obj.Init(table.Bytes, table.Pos)
    for f in fields(env.frame):
        want = getattr(env.frame, f.name)
        if f.name == "cloud_block_ms":
            np.testing.assert_allclose(obj.CloudBlockMsAsNumpy(), want, rtol=1e-6)
            continue
        if f.name == "padding":  # held as its length; the bytes are zeros
            assert obj.PaddingLength() == want and not obj.PaddingAsNumpy().any()
            continue
        got = getattr(obj, _camel(f.name))()
        if isinstance(want, TensorFrame):
            _check_tensor(got, want)
        elif want is None:
            assert got is None, f.name
        elif isinstance(want, str):
            if f.name == "kind":
                assert got == WEIGHT_KINDS.index(want)
            else:
                assert (got or b"").decode() == want, f.name
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6), f.name
        else:
            assert got == want, f.name


def _flatc_json(flatc: Path, buf: bytes, tmp_path: Path) -> dict:
    (tmp_path / "frame.srw").write_bytes(buf)
    subprocess.run(
        [
            str(flatc),
            "--json",
            "--strict-json",
            "--defaults-json",
            "--raw-binary",
            "-o",
            str(tmp_path),
            str(regen.SCHEMA),
            "--",
            str(tmp_path / "frame.srw"),
        ],
        check=True,
        capture_output=True,
    )
    return json.loads((tmp_path / "frame.json").read_text())


@pytest.mark.parametrize("env", SAMPLES, ids=lambda e: type(e.frame).__name__)
def test_flatc_json_reads_the_same_values(flatc, tmp_path, env):
    doc = _flatc_json(flatc, encode(env), tmp_path)
    assert doc["version_major"] == env.version.major and doc["version_minor"] == env.version.minor
    assert (doc["session"], doc["seq"], doc["sent_ns"]) == (env.session, env.seq, env.sent_ns)
    frame = env.frame
    assert doc["frame_type"] == type(frame).__name__
    got = doc["frame"]
    for f in fields(frame):
        want = getattr(frame, f.name)
        if isinstance(want, TensorFrame):
            t = got[f.name]
            assert t["dtype"] == want.dtype.name and t["codec"] == want.codec.name
            assert t["orig_dtype"] == want.orig_dtype.name
            assert t["shape"] == list(want.shape) and t["k"] == want.k and t["axis"] == want.axis
            assert bytes(t["payload"]) == want.payload.tobytes()
            for name in ("scales", "zero_points", "indices"):
                arr = getattr(want, name)
                if arr is not None:
                    np.testing.assert_allclose(t[name], arr, rtol=1e-6, atol=1e-6)  # flatc prints 6 decimals
        elif want is None:
            assert f.name not in got
        elif f.name == "kind":
            assert got[f.name] == want.upper()
        elif f.name == "code":
            assert got[f.name] == want.name
        elif f.name == "padding":  # held as its length; the bytes are zeros
            assert got[f.name] == [0] * want
        elif isinstance(want, float) or f.name == "cloud_block_ms":
            assert got[f.name] == pytest.approx(want, rel=1e-6), f.name
        elif isinstance(want, str) and want == "":
            assert got.get(f.name, "") == ""
        else:
            assert got[f.name] == want, f.name
