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
    history: list[dict[str, Any]] = field(default_factory=list)
    _last_step: int = -1

    def due(self, step: int) -> bool:
        if step < self.first_after:
            return False
        return self._last_step < 0 or step - self._last_step >= self.every

    def decide(self, step: int, snapshot: Any) -> Decision | None:
        """Consult the policy with calibrated inputs; a Decision when it says switch."""
        self._last_step = step
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

    def record_initial(self, step: int = 0) -> None:
        self.history.append(dict(step=step, point=self.current.point, codec=self.current.codec,
                                 staleness=self.current.staleness, predicted_step_ms=None, switch=False,
                                 reason="initial configuration (before any measurement)"))
