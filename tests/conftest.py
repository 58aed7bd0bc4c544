"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edge_sdk import zoo
from edge_sdk.optim import OptimizerConfig
from schemas import frames as fr


def make_hello(spec: zoo.ModelSpec, **over) -> fr.Hello:
    """A Hello the cloud accepts for ``spec`` (point 2, batch 8, int8, K=2), with ``over`` replacing fields."""
    fields = dict(
        model=spec.name,
        model_hash=spec.config_hash,
        num_blocks=spec.model.num_blocks,
        point=2,
        codec="int8",
        staleness=2,
        optimizer_json=OptimizerConfig().to_json(),
        token="",
        batch_size=8,
        seed=0,
        config_json="{}",
        runtime="eager",
        program_hash="",
    )
    fields.update(over)
    return fr.Hello(**fields)


@pytest.fixture
def hello_frame() -> Callable[..., fr.Hello]:
    return make_hello


@pytest.fixture
def digits_spec() -> zoo.ModelSpec:
    return zoo.build("digits_cnn", seed=0)
