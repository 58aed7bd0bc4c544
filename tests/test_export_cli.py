"""The export CLI, the manifest, and errors for heads that cannot lower."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edge_sdk import zoo
from edge_sdk.runtime.loading import load_runtime
from edge_sdk.runtime.program import ManifestError, sha256_file
from export.__main__ import main, parse_points
from export.api import export_head, map_name
from export.executorch_export import UnsupportedOperatorError
from export.program import UnsupportedLayerError


class Erfinv(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erfinv(torch.tanh(x) * 0.5)


def test_cli_writes_programs_and_manifest(tmp_path, capsys):
    out = tmp_path / "ts"
    assert (
        main(["--model", "mnist1d_cnn", "--points", "1,2", "--format", "torchscript", "--batch-size", "2", "--out", str(out)])
        == 0
    )
    log = capsys.readouterr().out
    assert "[1/2] point 1" in log and "[2/2] point 2" in log and "manifest.json" in log
    manifest = json.loads((out / "manifest.json").read_text())
    spec = zoo.build("mnist1d_cnn")
    assert manifest["model"] == "mnist1d_cnn" and manifest["config_hash"] == spec.config_hash
    assert manifest["format"] == "torchscript" and manifest["batch_size"] == 2
    assert manifest["exporter"]["torch"] == torch.__version__
    entry = manifest["points"]["2"]
    assert entry["sha256"] == sha256_file(out / entry["file"])
    assert entry["input"] == {"name": "x", "shape": [2, 1, 40], "dtype": "float32"}
    assert entry["features"]["shape"] == [2, 32, 20]
    assert [p["name"] for p in entry["parameters"]] == spec.model.head_param_names(2)
    assert [b["name"] for b in entry["buffers"]] == ["blocks.0.1.running_mean", "blocks.0.1.running_var"]
    # a tampered program is refused
    (out / entry["file"]).write_bytes(b"not a program")
    with pytest.raises(ManifestError, match="sha256"):
        load_runtime("torchscript", out, 2, spec.model.state_dict())
    with pytest.raises(ManifestError, match="exported points: 1, 2"):
        load_runtime("torchscript", out, 3, spec.model.state_dict())


def test_points_argument_is_validated():
    assert parse_points("all", [1, 2], 3) == [1, 2]
    assert parse_points("2,1", [1, 2], 3) == [1, 2]
    with pytest.raises(SystemExit, match="valid points"):
        parse_points("7", [1, 2], 3)
    with pytest.raises(SystemExit, match="valid points"):
        parse_points("0", [1, 2], 3)  # cut 0 has no head to export
    assert parse_points("3", [1, 2], 3) == [3]  # the whole model (device-only training)


def test_operator_without_kernel_is_named(tmp_path):
    head = nn.Sequential(nn.Linear(4, 4), Erfinv())
    with pytest.raises(UnsupportedOperatorError, match="erfinv"):
        export_head(head, (4,), point=1, batch_size=2, out_dir=tmp_path, fmt="executorch")


def test_overlapping_max_pool_is_refused_naming_the_operator(tmp_path):
    head = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(3, stride=2, padding=1))
    with pytest.raises(UnsupportedLayerError, match="max_pool2d_with_indices_backward"):
        export_head(head, (1, 8, 8), point=1, batch_size=2, out_dir=tmp_path, fmt="executorch")


def test_names_map_through_parameters():
    name_map = {"0.weight": "blocks.0.weight", "1.weight": "blocks.1.weight"}
    assert map_name("1.running_mean", name_map) == "blocks.1.running_mean"
    assert map_name("1", name_map) == "blocks.1"
    assert map_name("0.weight", name_map) == "blocks.0.weight"
    assert map_name("x", None) == "x"


def test_profile_runtime_times_a_step_and_leaves_statistics_alone():
    from edge_sdk.runtime.eager import EagerRuntime
    from edge_sdk.timing import profile_runtime

    class Replay(EagerRuntime):  # plain forward+backward: the timing does not depend on replay details
        def replay_backward(self, x, grad):
            self.module.train(True)
            self.module(x).backward(grad)

    head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
    rt = Replay(head)
    before = {k: v.clone() for k, v in rt.named_buffers().items()}
    r = profile_runtime(rt, torch.randn(4, 8), torch.randn(4, 16), repeats=3)
    assert set(r) == {"forward_ms", "replay_ms", "step_ms", "repeats"}
    assert 0 < r["forward_ms"] < 1000 and 0 < r["replay_ms"] < 1000
    assert r["step_ms"] >= r["forward_ms"] * 0.5  # a step contains a forward; medians are noisy
    for k, v in rt.named_buffers().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError):
        profile_runtime(rt, torch.randn(4, 8), torch.randn(4, 16), repeats=0)
