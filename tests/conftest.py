"""Shared test helpers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from edge_sdk import zoo
from edge_sdk.hello import hello_frame as hello_frame_for
from edge_sdk.optim import OptimizerConfig
from schemas import codecs
from schemas import frames as fr


def make_hello(spec: zoo.ModelSpec, **over) -> fr.Hello:
    """A Hello the cloud accepts for ``spec`` (point 2, batch 8, int8, K=2), with ``over`` replacing fields."""
    hello = hello_frame_for(spec, point=2, codec="int8", staleness=2, optimizer=OptimizerConfig(), batch_size=8)
    return dataclasses.replace(hello, **over)


@pytest.fixture
def hello_frame() -> Callable[..., fr.Hello]:
    return make_hello


@pytest.fixture
def digits_spec() -> zoo.ModelSpec:
    return zoo.build("digits_cnn", seed=0)


@pytest.fixture
def topk_bomb() -> Callable[[int], codecs.TensorFrame]:
    """A top-k tensor frame of a few bytes that claims ``n`` float32 elements."""

    def make(n: int) -> codecs.TensorFrame:
        return codecs.TensorFrame(
            dtype=codecs.DType.F32,
            shape=(n,),
            codec=codecs.Codec.TOPK,
            payload=np.ones(1, np.float32),
            k=1,
            indices=np.zeros(1, np.uint32),
        )

    return make


@pytest.fixture
async def cloud_server():
    """A running `CloudServer` on a free loopback port, default settings (tests that
    need other settings start their own)."""
    from cloud_backend.server import CloudServer, ServerConfig

    async with CloudServer(ServerConfig(port=0)) as server:
        yield server
