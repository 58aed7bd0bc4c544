"""The device's `Hello`: one place that says how a model and a run configuration introduce themselves.

The model's identity (name, config hash, block count, seed, constructor
arguments) comes from its `ModelSpec`, so device and cloud build the same model;
the rest is the run's choice.
"""

from __future__ import annotations

import json

from edge_sdk.optim import OptimizerConfig
from edge_sdk.zoo import ModelSpec
from schemas.frames import Hello

__all__ = ["hello_frame"]


def hello_frame(
    spec: ModelSpec,
    *,
    point: int,
    codec: str,
    staleness: int,
    optimizer: OptimizerConfig,
    batch_size: int,
    token: str = "",
    runtime: str = "eager",
    program_hash: str = "",
) -> Hello:
    return Hello(
        model=spec.name,
        model_hash=spec.config_hash,
        num_blocks=spec.model.num_blocks,
        point=point,
        codec=codec,
        staleness=staleness,
        optimizer_json=optimizer.to_json(),
        token=token,
        batch_size=batch_size,
        seed=spec.seed,
        config_json=json.dumps(spec.kwargs, sort_keys=True),
        runtime=runtime,
        program_hash=program_hash,
    )
