"""Decision policies: given the inputs and the current choice, what to run next.

A policy is a small swappable object (the way Flower swaps strategies): the
pipeline calls ``policy.decide(inputs, current, remaining_steps)`` at start and
every few steps and acts on ``decision.switch``. ``CostModelPolicy`` is the
context-aware one; ``FixedPolicy`` pins a configuration for static runs and the
benchmark sweeps.

Every decision carries a human-readable ``reason`` so a user can see *why*: the
winning breakdown, what bounds it, the runner-up, and (when it declines to
switch) the saving it weighed against the switch cost.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .cost_model import (
    _CODEC_RANK,
    Choice,
    DecisionInputs,
    Prediction,
    drain_time,
    migration_time,
    predict,
)
from .uncertainty import Uncertainty


@dataclass(frozen=True)
class Decision:
    """The policy's answer. ``choice``/``prediction`` are what to run *now*: the
    current choice when the policy declines to switch."""

    choice: Choice
    prediction: Prediction
    switch: bool
    reason: str
    #: predicted saving over the remaining steps of the best alternative (s)
    saving_s: float = 0.0
    #: one-off cost of switching to it: migration + drain (s)
    switch_cost_s: float = 0.0
    #: the best candidate found, whether or not we switch to it
    best: Prediction | None = None
    #: the current choice became illegal (constraints, memory): switch regardless of dwell
    required: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly record (a ``partition_history`` entry minus the step)."""
        return {
            **self.choice.to_dict(),
            "predicted_step_time_s": self.prediction.step_time_s,
            "switch": self.switch,
            "reason": self.reason,
            "saving_s": self.saving_s,
            "switch_cost_s": self.switch_cost_s,
            "breakdown": self.prediction.stages.breakdown(),
        }


class Policy(ABC):
    """Base class: one method, so a policy can be swapped without touching the pipeline."""

    @abstractmethod
    def decide(
        self,
        inputs: DecisionInputs,
        current: Choice | None,
        remaining_steps: int,
        uncertainty: Uncertainty | None = None,
    ) -> Decision:
        """Return what to run for the next ``remaining_steps`` steps (``uncertainty``:
        how far the measured inputs may be off; None = trust them exactly)."""


class FixedPolicy(Policy):
    """Always the same choice (static runs, sweeps). Switches only from something else."""

    def __init__(self, choice: Choice) -> None:
        self.choice = choice

    def decide(
        self,
        inputs: DecisionInputs,
        current: Choice | None,
        remaining_steps: int,
        uncertainty: Uncertainty | None = None,
    ) -> Decision:
        pred = predict(self.choice, inputs.with_remaining(remaining_steps))
        switch = current != self.choice
        return Decision(self.choice, pred, switch, f"fixed: {pred.explain()}", best=pred)


@dataclass
class CostModelPolicy(Policy):
    """Exhaustive search over (point, codec, K) with the cost model, plus hysteresis.

    * ``allowed_points`` / ``allowed_codecs``: None = every valid cut / every codec
      whose size is known. ``p = 0`` (raw input upload) is dropped unless
      ``allow_raw_upload``; points below ``min_head_blocks`` are dropped (privacy:
      a minimum head depth), except device-only ``p = L``, which keeps more private.
    * ``excluded``: (point, codec) -> why the privacy floor rules it out
      (:mod:`edge_sdk.privacy.floor`); the reason text says when one of them would
      have been the fastest, i.e. when privacy, not speed, decided.
    * ``max_staleness``: largest K tried; ``memory_budget_bytes`` caps K further
      (K+1 stored batches + error feedback + head activations/params/optimizer).
    * Among K that give the same time the smallest wins: staleness costs accuracy
      and memory, and beyond :func:`min_staleness_to_fill` it buys no speed.
    * Hysteresis: leave the current choice only when the saving over the remaining
      steps exceeds ``margin`` x (migration + drain) *and* ``min_saving_frac`` of
      the current total; the second term keeps near-equal candidates from
      flapping when the switch itself is almost free (codec or K change at K = 0).
    """

    allowed_points: Iterable[int] | None = None
    allowed_codecs: Iterable[str] | None = None
    max_staleness: int = 8
    #: a K the user fixed (``--staleness 3`` with ``--point auto``): only that K is tried
    fixed_staleness: int | None = None
    memory_budget_bytes: int | None = None
    allow_raw_upload: bool = False
    min_head_blocks: int = 0
    excluded: Mapping[tuple[int, str], str] = field(default_factory=dict)
    margin: float = 1.5
    min_saving_frac: float = 0.05
    #: totals within this fraction of the fastest count as equal; among them the
    #: milder codec, then the smaller K wins (the model does not price accuracy,
    #: and a 0.5 % gain is not worth int4 or two more steps of staleness)
    tie_tol: float = 0.01

    def __post_init__(self) -> None:
        if self.allowed_points is not None:
            self.allowed_points = tuple(int(p) for p in self.allowed_points)
        if self.allowed_codecs is not None:
            self.allowed_codecs = tuple(self.allowed_codecs)
        if self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")

    # -- candidates ---------------------------------------------------------

    def points(self, inputs: DecisionInputs) -> list[int]:
        """Cut points this policy may choose, after the privacy constraints."""
        L = inputs.num_blocks
        pts = []
        for p in inputs.points:
            if self.allowed_points is not None and p not in self.allowed_points:
                continue
            if p == 0 and not self.allow_raw_upload:
                continue
            if p < self.min_head_blocks and p != L:
                continue
            pts.append(p)
        return pts

    def codecs(self, inputs: DecisionInputs, point: int) -> list[str]:
        cs = [c for c in inputs.codecs_at(point) if (point, c) not in self.excluded]
        if point in (0, inputs.num_blocks) or self.allowed_codecs is None:
            return cs
        return [c for c in cs if c in self.allowed_codecs]

    def fits(self, pred: Prediction) -> bool:
        return self.memory_budget_bytes is None or pred.memory_bytes <= self.memory_budget_bytes

    def allows(self, choice: Choice, inputs: DecisionInputs) -> bool:
        """Whether ``choice`` is still a legal candidate (constraints may change)."""
        if choice.point not in self.points(inputs):
            return False
        if choice.point == inputs.num_blocks:
            return True
        return choice.codec in self.codecs(inputs, choice.point) and choice.staleness <= self.max_staleness

    def best_for(self, inputs: DecisionInputs, point: int, codec: str) -> tuple[Prediction | None, bool]:
        """Best K for one (point, codec): the smallest K within ``tie_tol`` of the
        fastest K that fits the memory budget.

        Returns (prediction, or None if even K = 0 does not fit; capped_by_memory).
        """
        if point == inputs.num_blocks:
            pred = predict(Choice(point, "fp32", 0), inputs)
            return (pred if self.fits(pred) else None), False
        preds: list[Prediction] = []
        capped = False
        ks = range(self.max_staleness + 1) if self.fixed_staleness is None else [self.fixed_staleness]
        for k in ks:
            pred = predict(Choice(point, codec, k), inputs)
            if not self.fits(pred):
                capped = True  # memory grows with K: no larger K fits either
                break
            preds.append(pred)
        if not preds:
            return None, False
        fastest = min(p.total_time_s for p in preds)
        best = next(p for p in preds if p.total_time_s <= fastest * (1 + self.tie_tol))
        # capped only matters if a K the budget forbids would have been clearly faster
        if capped:
            unbounded = predict(Choice(point, codec, self.max_staleness), inputs)
            capped = unbounded.total_time_s * (1 + self.tie_tol) < best.total_time_s
        return best, capped

    def candidates(self, inputs: DecisionInputs) -> list[tuple[Prediction, bool]]:
        """Every feasible (point, codec) with its best K, best first: candidates within
        ``tie_tol`` of the fastest come first, milder codec then smaller K first."""
        out = []
        for p in self.points(inputs):
            for c in self.codecs(inputs, p):
                pred, capped = self.best_for(inputs, p, c)
                if pred is not None:
                    out.append((pred, capped))
        if not out:
            return out
        fastest = min(p.total_time_s for p, _ in out)

        def key(pc: tuple[Prediction, bool]) -> tuple:
            pr = pc[0]
            near = pr.total_time_s <= fastest * (1 + self.tie_tol)
            if near:
                return (0, _CODEC_RANK.get(pr.codec, 99), pr.K, pr.total_time_s, -pr.point)
            return (1, pr.total_time_s, pr.K, _CODEC_RANK.get(pr.codec, 99), -pr.point)

        out.sort(key=key)
        return out

    def _privacy_note(self, inputs: DecisionInputs, best: Prediction) -> str:
        """``; privacy decided: ...`` when a (point, codec) the floor excludes would be faster than ``best``."""
        if not self.excluded:
            return ""
        faster: list[tuple[Prediction, str]] = []
        for (p, c), why in self.excluded.items():
            if p not in inputs.points or c not in inputs.codecs_at(p):
                continue
            if self.allowed_codecs is not None and c not in self.allowed_codecs:
                continue
            if self.allowed_points is not None and p not in self.allowed_points:
                continue
            pred, _ = replace(self, excluded={}).best_for(inputs, p, c)
            if pred is not None and pred.total_time_s < best.total_time_s * (1 - self.tie_tol):
                faster.append((pred, why))
        if not faster:
            return ""
        pred, why = min(faster, key=lambda pw: pw[0].total_time_s)
        return f"; privacy, not speed, decided: {pred.choice} would take {pred.step_time_s * 1e3:.1f} ms/step but {why}"

    # -- the decision -------------------------------------------------------

    def switch_cost(self, inputs: DecisionInputs, current: Prediction, new: Choice) -> float:
        """Migration (blocks + optimizer state + RTT) plus the drain of in-flight steps.

        Which changes drain is `Choice.needs_drain`.
        """
        cur = current.choice
        if not cur.needs_drain(new):
            return 0.0
        return migration_time(inputs, cur.point, new.point) + drain_time(current)

    def decide(
        self,
        inputs: DecisionInputs,
        current: Choice | None,
        remaining_steps: int,
        uncertainty: Uncertainty | None = None,
    ) -> Decision:
        """The best candidate, and whether leaving ``current`` for it surely pays.

        ``uncertainty``: how far each measured input may be off. A switch is taken
        only when its saving exceeds the threshold in *every* corner of that box
        (the current configuration and the candidate priced from the same
        perturbed inputs), and candidates closer than the uncertainty (up to 3 %)
        count as tied, so the milder codec and the smaller K win among them.
        """
        u = uncertainty or Uncertainty()
        policy = replace(self, tie_tol=max(self.tie_tol, min(u.largest, 0.03))) if u.largest > self.tie_tol else self
        return policy._decide(inputs.with_remaining(remaining_steps), current, u)

    def _decide(self, inputs: DecisionInputs, current: Choice | None, u: Uncertainty) -> Decision:
        cands = self.candidates(inputs)
        if not cands:
            raise ValueError(
                "no feasible configuration: every (point, codec, K=0) breaks the memory budget "
                "or the privacy constraints; allow more points/codecs or a larger budget"
            )
        best, capped = cands[0]
        # the runner-up that explains the cut: the best candidate at another point
        others = [pr for pr, _ in cands[1:] if pr.point != best.point] or [pr for pr, _ in cands[1:]]
        runner = others[0] if others else None
        why_best = best.explain()
        if capped:
            why_best += f"; K capped at {best.K} by the memory budget"
        if runner is not None:
            why_best += f"; runner-up {runner.choice} at {runner.step_time_s * 1e3:.1f} ms/step"
        why_best += self._privacy_note(inputs, best)

        if current is None:
            return Decision(best.choice, best, True, f"initial choice {why_best}", best=best)
        try:
            cur_pred: Prediction | None = predict(current, inputs)
        except ValueError:  # the current point/codec does not exist in these inputs
            cur_pred = None
        if cur_pred is None or not self.allows(current, inputs) or not self.fits(cur_pred):
            cost = self.switch_cost(inputs, cur_pred, best.choice) if cur_pred is not None else 0.0
            return Decision(
                best.choice,
                best,
                True,
                f"current {current} no longer allowed or over the memory budget; switching to {why_best}",
                switch_cost_s=cost,
                best=best,
                required=True,
            )
        if best.choice == current:
            return Decision(current, cur_pred, False, f"current choice is the best: {why_best}", best=best)

        saving = cur_pred.total_time_s - best.total_time_s
        worst = min(
            predict(current, corner).total_time_s - predict(best.choice, corner).total_time_s
            for corner in (scale.apply(inputs) for scale in u.corners())
        )
        cost = self.switch_cost(inputs, cur_pred, best.choice)
        threshold = self.margin * cost + self.min_saving_frac * cur_pred.total_time_s
        r = inputs.remaining_steps
        at_worst = f", {worst:.2f} s at worst within {u.describe()}" if u.largest > 0 else ""
        weighed = (
            f"saves {saving:.2f} s over {r} steps{at_worst}; "
            f"threshold {self.margin:g} x {cost:.2f} s switch cost + {self.min_saving_frac:.0%} of "
            f"{cur_pred.total_time_s:.2f} s = {threshold:.2f} s"
        )
        if min(saving, worst) > threshold:
            return Decision(
                best.choice,
                best,
                True,
                f"switching {current} -> {best.choice}: current re-estimated {cur_pred.explain()}, "
                f"candidate {why_best}; {weighed}",
                saving_s=saving,
                switch_cost_s=cost,
                best=best,
            )
        return Decision(
            current,
            cur_pred,
            False,
            f"keeping {cur_pred.explain()}; best alternative {best.explain()} {weighed}",
            saving_s=saving,
            switch_cost_s=cost,
            best=best,
        )
