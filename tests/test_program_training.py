"""Training through exported programs: the pipeline, repartitioning and the link.

Programs are exported once per module (it takes a while); the eager runtime is the
reference for every number.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch

from edge_sdk.client import EdgeClient
from edge_sdk.optim import OptimizerConfig
from edge_sdk.session import TrainingError
from edge_sdk.training import TrainConfig
from schemas import frames as fr
from tests.inprocess import InProcessRun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["executorch", "torchscript"])
def programs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"programs_{request.param}")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--model",
            "digits_cnn",
            "--points",
            "1,2",
            "--format",
            request.param,
            "--batch-size",
            "16",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, out


def test_program_training_and_repartition_track_eager(programs):
    kind, path = programs
    opt = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, schedule="constant")
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(8)]
    runs = []
    for runtime, programs in (("eager", None), (kind, str(path))):
        torch.manual_seed(9)
        run = InProcessRun("digits_cnn", 1, opt, runtime=runtime, programs=programs)
        for i, (x, y) in enumerate(data):
            if i == 4:
                run.move_to(2)  # block 1 comes from the cloud into the program of point 2
            run.step(x, y, 0)
        runs.append(run.merged_state())
    eager, program = runs
    for k in eager:
        torch.testing.assert_close(program[k].float(), eager[k].float(), rtol=1e-4, atol=1e-4, msg=f"{k} ({kind})")


async def test_client_trains_through_programs_and_cloud_checks_their_origin(programs, cloud_server):
    kind, path = programs
    cfg = TrainConfig(
        epochs=1, max_steps_per_epoch=10, batch_size=16, point=2, codec="int8", staleness=2, runtime=kind, programs=str(path)
    )
    server = cloud_server
    client = EdgeClient(f"ws://127.0.0.1:{server.port}", cfg)
    result = await asyncio.wait_for(client.run(), timeout=300)
    assert result.steps == 10 and result.runtime == kind
    assert 0.0 <= result.test_accuracy <= 1.0

    liar = EdgeClient(f"ws://127.0.0.1:{server.port}", cfg)
    session = liar.prepare()
    hello = session.hello()
    session.hello = lambda: fr.Hello(**{**hello.__dict__, "program_hash": "f" * 64})
    with pytest.raises(TrainingError, match="exported from another model config"):
        await asyncio.wait_for(liar.run(), timeout=60)


def test_programs_with_another_batch_size_are_a_clear_error(programs):
    kind, path = programs
    with pytest.raises(ValueError, match="batch size 16"):
        EdgeClient("ws://127.0.0.1:9", TrainConfig(batch_size=32, point=2, runtime=kind, programs=str(path)))


def test_the_engine_times_steps_on_the_program_runtime(programs, monkeypatch):
    """The decision engine's per-point step times come from the runtime that runs
    the head (the exported program, not eager), at the exported points only."""
    from edge_sdk import timing
    from edge_sdk.decision.cost_model import Choice
    from edge_sdk.decision.setup import build_controller
    from edge_sdk.training import build_local

    timed_on: list[str] = []

    class Recording(timing.SplitStepTimer):
        def __init__(self, runtime, *a, **kw) -> None:
            timed_on.append(runtime.name)
            super().__init__(runtime, *a, **kw)

    monkeypatch.setattr(timing, "SplitStepTimer", Recording)
    kind, path = programs
    cfg = TrainConfig(epochs=1, batch_size=16, codec="int8", runtime=kind, programs=str(path))
    setup = build_local(cfg)
    inputs = build_controller(cfg, setup, Choice(setup.point, "int8", 2)).base_inputs
    assert sorted(inputs.head_step_s) == [1, 2]  # the exported points, nothing else
    assert timed_on == [kind, kind]
