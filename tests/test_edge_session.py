"""The device session (`edge_sdk.session`) without a socket: its scheduling rule,
and the protocol driven in-process against the real cloud session."""

from __future__ import annotations

import pytest
import torch

from cloud_backend.session import CloudSession
from edge_sdk.emulation.inprocess import InProcessLink, Stuck
from edge_sdk.session import Closed, Compute, EdgeSession, Next, Received, Send, Sent, TrainingError, next_move
from edge_sdk.training import TrainConfig, build_local
from schemas import frames as fr
from schemas.errors import ErrorCode


# ------------------------------------------------------------ the rule alone
@pytest.mark.parametrize("polled", [False, True])
@pytest.mark.parametrize("window_full", [False, True])
def test_a_device_only_placement_never_waits_for_the_link(polled, window_full):
    assert next_move(device_only=True, polled=polled, window_full=window_full) is Next.ALONE


def test_a_split_step_polls_once_then_waits_only_while_the_window_is_full():
    assert next_move(device_only=False, polled=False, window_full=True) is Next.POLL
    assert next_move(device_only=False, polled=False, window_full=False) is Next.POLL
    assert next_move(device_only=False, polled=True, window_full=True) is Next.WAIT
    assert next_move(device_only=False, polled=True, window_full=False) is Next.START


# --------------------------------------------------------- driven in-process
class HeldLink(InProcessLink):
    """The cloud's answers wait until `release`, as on a slow link; every command is logged."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.held: list = []
        self.log: list = []
        self.holding = False  # the handshake goes through

    def _execute(self, command):
        self.log.append(command)
        return super()._execute(command)

    def _send(self, frame):
        before = len(self.inbox)
        sent = super()._send(frame)
        if self.holding:
            replies = list(self.inbox)[before:]
            for _ in replies:
                self.inbox.pop()
            self.held += replies
        return sent

    def release(self, kind: type = object) -> None:
        """Deliver the held frames of ``kind``, in order; drop the others."""
        self.inbox.extend(r for r in self.held if isinstance(r.envelope.frame, kind))
        self.held.clear()


def _session(staleness: int, **over) -> tuple[EdgeSession, CloudSession]:
    cfg = TrainConfig(point=2, codec="int8", staleness=staleness, batch_size=16, **over)
    return EdgeSession(cfg, build_local(cfg)), CloudSession(1)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_at_most_one_arrived_gradient_is_applied_before_the_next_step():
    edge, cloud = _session(staleness=2)
    link = HeldLink(edge, cloud)
    link.drive(edge.handshake())
    link.holding = True
    for i in range(3):
        link.drive(edge.train_batch(*_batch(i), epoch=0))
    assert edge.pipeline.in_flight == 3
    link.release(fr.Gradients)  # three gradients arrive together (step 0's Context answer is dropped)
    link.log.clear()
    link.drive(edge.train_batch(*_batch(3), epoch=0))
    kinds = [type(c).__name__ for c in link.log if type(c).__name__ != "Now"]
    # one poll, apply that gradient, then the new step's forward and upload
    assert kinds == ["Receive", "Compute", "Compute", "Send"], kinds
    assert edge.pipeline.steps_applied == 1 and edge.pipeline.in_flight == 3
    assert isinstance(link.log[-1], Send) and isinstance(link.log[-1].frame, fr.Features)
    assert len(link.inbox) == 2  # the others wait for the next batches


def test_a_full_window_waits_for_a_gradient_and_never_starts_a_step_past_k():
    edge, cloud = _session(staleness=1)
    link = HeldLink(edge, cloud)
    link.drive(edge.handshake())
    link.holding = True
    link.drive(edge.train_batch(*_batch(0), epoch=0))
    link.drive(edge.train_batch(*_batch(1), epoch=0))  # K + 1 = 2 steps in flight
    with pytest.raises(Stuck):
        link.drive(edge.train_batch(*_batch(2), epoch=0))
    assert edge.pipeline.next_step == 2  # no third step was started
    link.release()
    link.drive(edge.train_batch(*_batch(2), epoch=0))
    assert edge.pipeline.next_step == 3 and edge.pipeline.steps_applied == 1


def test_a_whole_run_in_process_trains_evaluates_and_reports():
    edge, cloud = _session(staleness=2, epochs=2, max_steps_per_epoch=6)
    link = InProcessLink(edge, cloud)
    result = link.drive(edge.run(0.0))
    assert result.steps == 12 == cloud.applied_steps
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert [h["steps"] for h in result.history] == [6, 12]
    assert 0.0 < result.test_accuracy <= 1.0
    assert result.partition_history[0]["reason"] == "fixed by the user"
    assert isinstance(link.sent[0], fr.Hello) and isinstance(link.sent[-1], fr.Bye)
    # the in-process clock ticks per read: the step times it reported are increasing
    assert result.step_times == sorted(result.step_times) and len(result.step_times) == 12


def _answer_with(steps, answer):
    """Drive ``steps`` answering every command with ``answer`` (Send gets a stamp)."""
    reply = None
    while True:
        command = steps.send(reply)
        reply = Sent(0, 0) if isinstance(command, Send) else answer
        assert not isinstance(command, Compute)


def test_a_lost_link_and_a_refusal_end_the_run_with_the_reason():
    edge, _ = _session(staleness=0)
    with pytest.raises(TrainingError, match="link went away"):
        _answer_with(edge.handshake(), Closed("link went away"))
    refusal = Received(fr.Envelope(frame=fr.Error(code=ErrorCode.UNAUTHORIZED, message="bad token", step=-1)), 0, 0)
    with pytest.raises(TrainingError, match=r"cloud refused: bad token \(UNAUTHORIZED\)"):
        _answer_with(edge.handshake(), refusal)


def test_alone_for_long_the_cloud_figures_are_forgotten_ever_more_rarely(caplog):
    """A device that went alone because the cloud was slow would never see it
    recover (only probes cross the link, and they time the link, not the cloud):
    after a while alone the cloud's old compute figures give way to the profile's,
    and the wait doubles each time."""
    from edge_sdk.decision.controller import DecisionController
    from edge_sdk.decision.cost_model import Choice
    from edge_sdk.decision.policy import CostModelPolicy
    from tests.decision_inputs import make

    cfg = TrainConfig(point="device", batch_size=16)
    setup = build_local(cfg)
    L = setup.spec.model.num_blocks
    ctl = DecisionController(make(20), CostModelPolicy(), Choice(L, "fp32", 0), total_steps=1000, first_after=10**9)
    edge, cloud = EdgeSession(cfg, setup, controller=ctl), CloudSession(1)
    link = InProcessLink(edge, cloud)
    link.drive(edge.handshake())
    edge.tracker.observe_remote(cloud_step_ms=100.0, cloud_block_ms={3: 40.0})  # a slow cloud, measured long ago
    edge._cloud_ttl_s = 0.05  # (60 s in a run; the in-process clock ticks 1 ms per reading)
    x, y = _batch(0)
    with caplog.at_level("INFO", logger="edge_sdk"):
        link.drive(edge.train_batch(x, y, 0))
        assert edge.tracker.snapshot().cloud_step_ms == 100.0  # fresh enough
        for _ in range(80):
            link.drive(edge.train_batch(x, y, 0))
    snap = edge.tracker.snapshot()
    assert snap.cloud_step_ms is None and not snap.cloud_block_ms  # the profile prices the cloud again
    forgot = caplog.text.count("the cloud's compute figures are that old")
    assert forgot >= 2 and edge._cloud_ttl_s == pytest.approx(0.05 * 2**forgot)
