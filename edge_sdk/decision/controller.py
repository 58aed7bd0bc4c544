"""When to ask the policy, and what to remember of its answers (sans-I/O).

The client calls :meth:`DecisionController.due` after each applied step; when a
decision is due it hands over the current context snapshot and gets back a
:class:`Decision` to act on (drain, repartition, change codec or K) or None.
Every consultation is recorded for the run's ``partition_history``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_sdk.decision.cost_model import Choice, DecisionInputs, apply_context
from edge_sdk.decision.policy import Decision, Policy


@dataclass
class DecisionController:
    base_inputs: DecisionInputs
    policy: Policy
    current: Choice
    total_steps: int
    first_after: int = 10  # steps of measurement before the first decision
    every: int = 10
    #: also decide when this much time passed since the last decision: on a link
    #: that just collapsed, 10 steps can take minutes
    every_s: float = 2.0
    min_steps_between: int = 3  # fresh measurements of the current choice first
    history: list[dict[str, Any]] = field(default_factory=list)
    _last_step: int = -1
    _last_time: float = 0.0
    _forced_at: int | None = None

    def force(self, step: int) -> None:
        """Re-decide after ``min_steps_between`` more steps (the link just changed)."""
        self._forced_at = step

    def due(self, step: int, now_s: float = 0.0) -> bool:
        if step < self.first_after:
            return False
        if self._forced_at is not None and step - self._forced_at >= self.min_steps_between:
            return True
        if self._last_step < 0:
            return True
        since = step - self._last_step
        return since >= self.every or (since >= self.min_steps_between and now_s - self._last_time >= self.every_s)

    def decide(self, step: int, snapshot: Any, now_s: float = 0.0) -> Decision | None:
        """Consult the policy with calibrated inputs; a Decision when it says switch."""
        self._last_step = step
        self._last_time = now_s
        self._forced_at = None
        remaining = max(1, self.total_steps - step)
        inputs = apply_context(self.base_inputs.with_remaining(remaining), snapshot, self.current)
        decision = self.policy.decide(inputs, self.current, remaining)
        pred = decision.prediction
        self.history.append(
            dict(
                step=step,
                point=decision.choice.point,
                codec=decision.choice.codec,
                staleness=decision.choice.staleness,
                predicted_step_ms=1e3 * pred.step_time_s,
                switch=decision.switch,
                reason=decision.reason,
                stages_ms={k: (1e3 * v if isinstance(v, float) else v) for k, v in pred.stages.breakdown().items()},
                link={"uplink_bps": inputs.link.uplink_bps, "downlink_bps": inputs.link.downlink_bps, "rtt_s": inputs.link.rtt_s},
            )
        )
        return decision if decision.switch and decision.choice != self.current else None
