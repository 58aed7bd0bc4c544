"""A device and a cloud session trained in-process, for exact comparisons.

The production `EdgeSession` against the production `CloudSession`, joined by
`edge_sdk.emulation.inprocess.InProcessLink` (every frame through the real
encoder/decoder). This wrapper only fixes what the comparisons need: one batch
per `step`, its gradient applied before the next (K=0 is then exactly sequential
split learning), and `move_to` for the repartition exchange.
"""

from __future__ import annotations

import torch

from cloud_backend.session import CloudSession, SessionConfig
from edge_sdk.decision.cost_model import Choice
from edge_sdk.emulation.inprocess import InProcessLink
from edge_sdk.optim import OptimizerConfig
from edge_sdk.session import EdgeSession
from edge_sdk.training import TrainConfig, build_local
from schemas import frames as fr


def wire(frame):
    return fr.decode(fr.encode(fr.Envelope(frame=frame))).frame


class InProcessRun:
    """``point``/``codec``/``staleness`` fixed; ``runtime``/``programs`` as for `TrainConfig`."""

    def __init__(
        self,
        name: str,
        point: int,
        opt: OptimizerConfig,
        *,
        codec: str = "fp32",
        staleness: int = 0,
        runtime: str = "eager",
        programs: str | None = None,
    ) -> None:
        cfg = TrainConfig(
            model=name,
            point=point,
            codec=codec,
            grad_codec=codec,  # both ways the same: fp32 makes the comparisons exact
            staleness=staleness,
            batch_size=16,
            epochs=opt.epochs,
            optimizer=opt.name,
            lr=opt.lr,
            momentum=opt.momentum,
            weight_decay=opt.weight_decay,
            schedule=opt.schedule,
            runtime=runtime,
            programs=programs,
        )
        self.session = EdgeSession(cfg, build_local(cfg))
        self.model = self.session.setup.spec.model
        self.cloud = CloudSession(1, SessionConfig(shared_rng=True))  # one RNG stream: exact comparisons
        self.link = InProcessLink(self.session, self.cloud)
        self.link.drive(self.session.handshake())

    @property
    def pipe(self):
        return self.session.pipeline

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        self.link.drive(self.session.train_batch(x, y, epoch))
        self.link.drive(self.session.drain())

    def move_to(self, point: int) -> list[fr.Weights]:
        """Move the cut; returns the Weights frames that came down."""
        choice = self.session.choice
        self.link.drive(self.session.switch(Choice(point, choice.codec, choice.staleness)))
        assert self.pipe.point == self.cloud.point == point
        return self.session.last_migration

    def merged_state(self) -> dict[str, torch.Tensor]:
        """Head tensors from the device, tail tensors from the cloud."""
        self.session.sync_head_to_model()
        edge = self.model.state_dict()
        cloud = self.cloud.spec.model.state_dict()
        p = self.pipe.point
        return {k: (edge[k] if int(k.split(".")[1]) < p else cloud[k]) for k in edge}
