"""When to ask the policy, on what evidence, and what to remember of its answers (sans-I/O).

The client calls :meth:`DecisionController.due` after each applied step; when a
decision is due it hands over the current context snapshot and gets back a
:class:`Decision` to act on (drain, repartition, change codec or K) or None.
Every consultation is recorded for the run's ``partition_history``.

Three rules keep the engine from chasing noise (a switch costs a drain, and
flapping between near-equal configurations costs more than either):

* **Evidence first.** No decision while an input the choice depends on is still
  assumed: a link direction without its own estimate (the 10 Mbit/s prior, or an
  estimator that was reset by a link change and has seen too few frames), or too
  few compute samples. The consultation is recorded as *waiting*.
* **Surely faster.** The policy gets each input's uncertainty (how much it wandered
  over recent decisions, :class:`~edge_sdk.decision.uncertainty.SpreadTracker`) and
  switches only when the saving survives every corner of it.
* **Dwell.** After a switch the new configuration runs ``min_dwell_steps`` before
  another switch is considered, unless the link changed (``force``) or the
  current configuration became illegal.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from edge_sdk.decision.cost_model import (
    LINK_MIN_SAMPLES,
    MAX_SPLIT_SLOWDOWN,
    MIN_INTERVAL_SAMPLES,
    SPLIT_SLOWDOWN_BAND,
    Choice,
    DecisionInputs,
    apply_context,
    device_compute_factor,
    migration_time,
    predict,
    split_slowdown,
)
from edge_sdk.decision.policy import CostModelPolicy, Decision, Policy
from edge_sdk.decision.uncertainty import DecisionInputsScale, SpreadTracker

#: samples an estimate needs (since its last reset) before the engine acts on it
MIN_SAMPLES = {"uplink": LINK_MIN_SAMPLES, "downlink": LINK_MIN_SAMPLES, "rtt": 0, "edge_step": 3, "cloud_step": 3}
#: how far off (relative) the start-up probes' link estimates may be when judging
#: whether more probes could change the start-up choice (`initial_settled`)
START_LINK_UNCERTAINTY = 0.3
#: link samples the start-up decision may rest on: the handshake's three small
#: probes and one padded one (each direction's delay fit has its two sizes) ...
START_MIN_SAMPLES = 4
#: ... with the link taken to be up to this factor off while it has fewer than
#: `MIN_SAMPLES`: only a choice that clear is settled on so little
START_FEW_SAMPLES_FACTOR = 4.0
#: candidates re-priced at the corners of that band, and how much slower than
#: a corner's best the start-up choice may be there and still count as settled
#: (the policy's widest tie tolerance: more probes would buy at most this much)
SETTLE_CONTENDERS = 6
SETTLE_TOLERANCE = 0.03
#: without a link estimate, training alone is taken from a split only when its
#: predicted step is this much faster than the split's measured one
#: (`DecisionController._alone_on_measured_interval`)
ALONE_RESCUE_FACTOR = 1.5


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
    #: and no regular decision sooner than this after the last: a decision prices a
    #: few hundred candidates on the device's own CPU (~10 ms here), which a 5 ms
    #: step must not pay every 10 steps
    min_interval_s: float = 1.0
    #: steps a new configuration runs before the next switch (a link change overrides)
    min_dwell_steps: int = 50
    min_samples: dict[str, int] = field(default_factory=lambda: dict(MIN_SAMPLES))
    spreads: SpreadTracker = field(default_factory=SpreadTracker)
    history: list[dict[str, Any]] = field(default_factory=list)
    _last_step: int = -1
    _last_time: float = 0.0
    _forced_at: int | None = None
    _switched_at: int | None = None
    _link_changed_at: int | None = None
    #: what split steps measured beyond the model (`cost_model.split_slowdown`): kept
    #: while the device trains alone, where it cannot be measured, so an engine that
    #: left a split for being slow does not go back on the model's word alone
    split_slowdown: float = 1.0
    _slow_seen: list[float] = field(default_factory=list)
    #: the device's compute while splitting over its compute alone
    #: (`DecisionInputs.split_compute_factor`), learned at the first settled
    #: measurement after each change between the two: comparing readings taken
    #: close together keeps a device that gets busier in general (which slows
    #: both) from reading as a split that costs the device more
    split_compute_factor: float = 1.0
    #: the last settled compute factor (measured / start-up timing) of each kind,
    #: True = training alone; the start-up timing measured alone at 1.0
    _compute_factor: dict[bool, float] = field(default_factory=lambda: {True: 1.0})
    _compute_kind: bool = True
    #: steps after a link change before a split's step interval is believed again
    settle_steps: int = 20

    def force(self, step: int) -> None:
        """Re-decide after ``min_steps_between`` more steps (the link just changed),
        dwell or not."""
        self._forced_at = step
        self._link_changed_at = step
        self._slow_seen = []

    def switched(self, step: int) -> None:
        """The transport acted on a decision at ``step``: start the dwell."""
        self._switched_at = step
        self._slow_seen = []  # another configuration: its own interval, measured afresh

    def due(self, step: int, now_s: float = 0.0) -> bool:
        if step < self.first_after:
            return False
        if self._forced_at is not None and step - self._forced_at >= self.min_steps_between:
            return True
        if self._last_step < 0:
            return True
        since, elapsed = step - self._last_step, now_s - self._last_time
        if elapsed < self.min_interval_s:
            return False
        return since >= self.every or (since >= self.min_steps_between and elapsed >= self.every_s)

    # -- evidence -----------------------------------------------------------

    def needed(self, choice: Choice) -> tuple[str, ...]:
        """Estimates a decision from ``choice`` depends on. Device-only runs send
        no features: its link estimates come from the periodic probes, and
        there is no cloud step to time."""
        device_only = choice.point >= self.base_inputs.num_blocks
        names = ["uplink", "downlink", "rtt", "edge_step"]
        if not device_only:
            names.append("cloud_step")
        return tuple(names)

    def missing(self, snapshot: Any, least: int | None = None) -> list[str]:
        """Human-readable list of the needed inputs that are still assumed
        (``least``: the link samples required instead of `min_samples`)."""
        samples = getattr(snapshot, "samples", {}) or {}
        min_samples = dict(self.min_samples)
        if least is not None:
            min_samples.update(uplink=least, downlink=least)
        value_of = {
            "uplink": getattr(snapshot, "uplink_bps", None),
            "downlink": getattr(snapshot, "downlink_bps", None),
            "rtt": getattr(snapshot, "rtt_s", None),
            "edge_step": getattr(snapshot, "edge_step_ms", None),
            "cloud_step": getattr(snapshot, "cloud_step_ms", None),
        }
        link = self.base_inputs.link
        prior = {
            "uplink": f"prior {link.uplink_bps / 1e6:g} Mbit/s",
            "downlink": f"prior {link.downlink_bps / 1e6:g} Mbit/s",
            "rtt": f"prior {link.rtt_s * 1e3:g} ms",
        }
        out = []
        for name in self.needed(self.current):
            n = int(samples.get(name, 0))
            if value_of[name] is None:
                out.append(f"{name} ({prior.get(name, 'profile')}, {n} samples)")
            elif n < min_samples.get(name, 0):
                out.append(f"{name} ({n}/{min_samples[name]} samples since reset)")
        return out

    @staticmethod
    def provenance(snapshot: Any) -> str:
        """Which inputs were measured, how, and on how many samples."""
        samples = getattr(snapshot, "samples", {}) or {}
        methods = getattr(snapshot, "methods", {}) or {}
        parts = []
        for name in ("uplink", "downlink"):
            parts.append(f"{name} {methods.get(name) or 'assumed'} ({samples.get(name, 0)})")
        for name in ("rtt", "edge_step", "cloud_step"):
            parts.append(f"{name.replace('_step', '')} ({samples.get(name, 0)})")
        return "measured: " + ", ".join(parts)

    # -- the decision -------------------------------------------------------

    def decide(self, step: int, snapshot: Any, now_s: float = 0.0) -> Decision | None:
        """Consult the policy with calibrated inputs; a Decision when it says switch."""
        self._last_step = step
        self._last_time = now_s
        self.spreads.observe(snapshot)
        remaining = max(1, self.total_steps - step)
        inputs = self._calibrated(step, snapshot, remaining)
        missing = self.missing(snapshot)
        if missing:
            rescue = self._alone_on_measured_interval(step, snapshot, inputs, remaining, missing, now_s)
            if rescue is not None:
                self._forced_at = None
                return rescue
            self._record_wait(
                step, f"waiting for measurements before deciding: {', '.join(missing)} still assumed", inputs, now_s
            )
            return None  # a forced decision stays due until the evidence is in
        forced = self._forced_at is not None
        self._forced_at = None
        uncertainty = self.spreads.uncertainty()
        decision = self.policy.decide(inputs, self.current, remaining, uncertainty)
        reason = f"{decision.reason}; {self.provenance(snapshot)}"
        wants_switch = decision.switch and decision.choice != self.current
        since = step - self._switched_at if self._switched_at is not None else None
        if wants_switch and since is not None and since < self.min_dwell_steps and not forced and not decision.required:
            reason = f"dwell: {since} of {self.min_dwell_steps} steps since the last switch, not switching yet; {reason}"
            decision = Decision(self.current, decision.best or decision.prediction, False, reason, best=decision.best)
            wants_switch = False
        self._record(step, decision, reason, inputs, uncertainty.to_dict(), switch=wants_switch, time_s=now_s)
        return decision if wants_switch else None

    def _alone_on_measured_interval(
        self, step: int, snapshot: Any, inputs: DecisionInputs, remaining: int, missing: list[str], now_s: float
    ) -> Decision | None:
        """Training alone, decided without a link estimate: both sides are measured.

        Why: after a link change the estimators start afresh, and a split whose
        frames are all one size, queued behind each other on a slow link, may give
        the delay fit nothing to work with for a long time (measured: 100 s of
        waiting at 2 s/step after the wifi -> iot drop). Training alone needs no
        link, and the split's cost is its measured step interval. So when only the
        link is missing, the device-only step (calibrated like every decision) is
        compared with the measured interval of the current split (at least
        `MIN_INTERVAL_SAMPLES` since the change), and taken when it is at least
        ``ALONE_RESCUE_FACTOR`` x faster and the saving clears the usual threshold.
        Alone, the probes measure the link, and the usual rules bring a split back.
        """
        L = inputs.num_blocks
        policy = self.policy
        if self.current.point >= L or not isinstance(policy, CostModelPolicy):
            return None
        if any(m.split()[0] not in ("uplink", "downlink") for m in missing):
            return None
        interval = getattr(snapshot, "step_interval_ms", None)
        n = (getattr(snapshot, "samples", {}) or {}).get("step_interval", 0)
        if not interval or n < MIN_INTERVAL_SAMPLES:
            return None
        alone = Choice(L, "fp32", 0)
        if not policy.allows(alone, inputs):
            return None
        pred, _ = policy.best_for(inputs, L, "fp32")
        if pred is None:
            return None
        measured_s = interval / 1e3
        saving = (measured_s - pred.step_time_s) * remaining
        # the switch's cost without a link estimate: each step brought one gradient
        # down within the interval, a lower bound on the downlink for the tail's
        # weights (`migration_time`); draining waits K intervals
        per_step_down = inputs.gradient_nbytes(self.current.point, self.current.codec) + inputs.frame_overhead_bytes
        floor = inputs.with_link(replace(inputs.link, downlink_bps=8.0 * max(1, per_step_down) / measured_s))
        cost = migration_time(floor, self.current.point, L) + self.current.K * measured_s
        threshold = policy.margin * cost + policy.min_saving_frac * measured_s * remaining
        if pred.step_time_s * ALONE_RESCUE_FACTOR > measured_s or saving <= threshold:
            return None
        reason = (
            f"switching {self.current} -> {alone}: device-only, {1e3 * pred.step_time_s:.1f} ms/step, against the "
            f"current split's measured {interval:.1f} ms/step over {n} steps; the link is not measured yet "
            f"({', '.join(missing)}) and training alone does not need it; saves {saving:.2f} s over {remaining} steps, "
            f"threshold {policy.margin:g} x {cost:.2f} s switch cost (at most) + {policy.min_saving_frac:.0%} of "
            f"{measured_s * remaining:.2f} s = {threshold:.2f} s"
        )
        decision = Decision(alone, pred, True, reason, saving_s=saving, best=pred)
        self._record(step, decision, reason, inputs, self.spreads.uncertainty().to_dict(), switch=True, time_s=now_s)
        return decision

    def _calibrated(self, step: int, snapshot: Any, remaining: int) -> DecisionInputs:
        """`apply_context`, plus the split slowdown: learned from the current split
        when its interval is settled (two decisions in a row agree, no link change
        in ``settle_steps``), remembered otherwise."""
        settled = self._forced_at is None and (self._link_changed_at is None or step - self._link_changed_at >= self.settle_steps)
        if settled:
            self._learn_split_compute(snapshot)
        inputs = apply_context(self._inputs(remaining), snapshot, self.current)
        seen = split_slowdown(inputs, snapshot, self.current) if settled else None
        if seen is not None:
            self._slow_seen = [*self._slow_seen[-1:], seen]
            if len(self._slow_seen) == 2:
                self.split_slowdown = min(self._slow_seen)
                inputs = replace(inputs, split_slowdown=self.split_slowdown)
        return inputs

    def _inputs(self, remaining: int) -> DecisionInputs:
        """The start-up inputs with what the controller learned about splits."""
        return replace(
            self.base_inputs.with_remaining(remaining),
            split_slowdown=self.split_slowdown,
            split_compute_factor=self.split_compute_factor,
        )

    def _learn_split_compute(self, snapshot: Any) -> None:
        """Record the current kind's compute factor; on the first reading after a
        change of kind, set `split_compute_factor` from the two latest readings."""
        samples = (getattr(snapshot, "samples", {}) or {}).get("edge_step", 0)
        if samples < self.min_samples["edge_step"]:
            return
        alone = self.current.point >= self.base_inputs.num_blocks
        factor = device_compute_factor(self.base_inputs, snapshot, self.current)  # split_compute_factor 1
        if factor is None:
            return
        self._compute_factor[alone] = factor
        if alone != self._compute_kind:
            ratio = self._compute_factor[False] / self._compute_factor[True]
            self.split_compute_factor = 1.0 if ratio < SPLIT_SLOWDOWN_BAND else min(MAX_SPLIT_SLOWDOWN, ratio)
        self._compute_kind = alone

    def initial(self, snapshot: Any, now_s: float = 0.0) -> Decision | None:
        """The choice before the first step, once the link was probed.

        Nothing is in flight and both ends hold the seed's weights (the cut moves
        for one round trip, see ``Repartition.state_hash``), so the best candidate
        is taken outright, with no switch cost to weigh. Device and cloud compute
        come from the start-up timing, not from an assumption; without a measured
        link the start-up choice stays and the normal decisions take over.
        """
        link_missing = self._link_missing(snapshot, START_MIN_SAMPLES)
        inputs = apply_context(self.base_inputs.with_remaining(self.total_steps), snapshot, None)
        if link_missing:
            self._record_wait(0, f"no initial decision: {', '.join(link_missing)} still assumed", inputs, now_s)
            return None
        self.spreads.observe(snapshot)
        decision = self.policy.decide(inputs, None, self.total_steps)
        switch = decision.choice != self.current
        reason = f"{decision.reason}; {self.provenance(snapshot)}; device and cloud compute from the start-up timing"
        self._record(0, decision, reason, inputs, self.spreads.uncertainty().to_dict(), switch=switch, time_s=now_s)
        return decision if switch else None

    def initial_settled(self, snapshot: Any) -> bool:
        """Whether more start-up probes could still change the start-up choice.

        Why: each probe costs a round trip (~35 ms on WiFi, ~250 ms on a 250 kbit/s
        link) before the first step, and on a short run that is several per cent
        of the whole. Once the link is measured at all (`START_MIN_SAMPLES`), the
        choice is *settled* when the best candidate stays within
        ``SETTLE_TOLERANCE`` of the best with both link directions
        ``1 +- START_LINK_UNCERTAINTY`` off (``START_FEW_SAMPLES_FACTOR`` either
        way while the estimators have fewer than `MIN_SAMPLES`):
        device-only against a link-bound split decides after a few probes, two
        near-equal splits keep probing up to the budget. Only the ``SETTLE_CONTENDERS``
        best candidates at the measured link and each point's best are re-priced
        at the corners (another codec further behind is taken not to overtake
        within the band), so the check costs a few dozen predictions, not a
        search per corner.
        """
        if self._link_missing(snapshot, START_MIN_SAMPLES):
            return False
        policy = self.policy
        if not isinstance(policy, CostModelPolicy):
            return True  # nothing the link could change
        inputs = apply_context(self.base_inputs.with_remaining(self.total_steps), snapshot, None)
        cands = policy.candidates(inputs)
        if len(cands) < 2:
            return True
        # the best few, and each point's best: a wide band can make another cut win
        best_codec: dict[int, str] = {}
        for pred, _ in cands:
            best_codec.setdefault(pred.point, pred.codec)
        top = [(pred.point, pred.codec) for pred, _ in cands[:SETTLE_CONTENDERS]]
        contenders = list(dict.fromkeys(top + list(best_codec.items())))
        samples = getattr(snapshot, "samples", {}) or {}
        if min(samples.get("uplink", 0), samples.get("downlink", 0)) < min(
            self.min_samples["uplink"], self.min_samples["downlink"]
        ):
            band = (1 / START_FEW_SAMPLES_FACTOR, START_FEW_SAMPLES_FACTOR)
        else:
            band = (1 - START_LINK_UNCERTAINTY, 1 + START_LINK_UNCERTAINTY)
        for up, down in itertools.product(band, repeat=2):
            corner = DecisionInputsScale(uplink=up, downlink=down).apply(inputs)
            # each (point, codec) at its best K there: K follows the link within a run
            totals = [
                pred.total_time_s if pred else float("inf") for pred, _ in (policy.best_for(corner, *c) for c in contenders)
            ]
            if totals[0] > min(totals) * (1 + max(policy.tie_tol, SETTLE_TOLERANCE)):
                return False
        return True

    def _link_missing(self, snapshot: Any, least: int) -> list[str]:
        """The link inputs among `missing`: what the start-up decision waits for."""
        return [m for m in self.missing(snapshot, least) if m.split()[0] in ("uplink", "downlink", "rtt")]

    def device_only_estimate(self, snapshot: Any, steps: int) -> dict[str, Any]:
        """Predicted cost of ``steps`` steps of training alone, calibrated by the
        measurements in ``snapshot`` as every decision is; ``measured`` says whether
        the device-only step itself was timed (start-up, or the run trained alone)."""
        L = self.base_inputs.num_blocks
        inputs = apply_context(self._inputs(max(1, steps)), snapshot, self.current)
        pred = predict(Choice(L, "fp32", 0), inputs)
        return {
            "step_ms": 1e3 * pred.step_time_s,
            "train_s": pred.step_time_s * steps,
            "measured": L in self.base_inputs.head_step_s or self.current.point == L,
        }

    def _record(
        self,
        step: int,
        decision: Decision,
        reason: str,
        inputs: DecisionInputs,
        uncertainty: dict,
        *,
        switch: bool,
        time_s: float,
    ) -> None:
        pred = decision.prediction
        self.history.append(
            dict(
                step=step,
                time_s=time_s,
                point=decision.choice.point,
                codec=decision.choice.codec,
                staleness=decision.choice.staleness,
                predicted_step_ms=1e3 * pred.step_time_s,
                switch=switch,
                reason=reason,
                stages_ms={k: (1e3 * v if isinstance(v, float) else v) for k, v in pred.stages.breakdown().items()},
                link=_link(inputs),
                uncertainty=uncertainty,
            )
        )

    def _record_wait(self, step: int, reason: str, inputs: DecisionInputs, time_s: float) -> None:
        last = self.history[-1] if self.history else None
        if last is not None and last.get("waiting"):
            last.update(reason=reason, waited_until=step)  # one entry per stretch of waiting
            return
        c = self.current
        self.history.append(
            dict(
                step=step,
                time_s=time_s,
                point=c.point,
                codec=c.codec,
                staleness=c.staleness,
                predicted_step_ms=None,
                switch=False,
                waiting=True,
                reason=reason,
                link=_link(inputs),
            )
        )


def _link(inputs: DecisionInputs) -> dict[str, float]:
    return {"uplink_bps": inputs.link.uplink_bps, "downlink_bps": inputs.link.downlink_bps, "rtt_s": inputs.link.rtt_s}
