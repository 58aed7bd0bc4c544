"""How much the engine may trust its measured inputs, and what "surely faster" means.

Why: every input of the cost model is a running estimate, and on a shared device
(a phone running other apps, a 2-core VM running the cloud too) each wanders by
several per cent from one decision to the next. A policy that compares two
predictions by their point values then flips between near-equal configurations
whenever the noise reorders them (13 switches in 900 steps of the demo on a
loaded machine). So a switch must pay even in the worst corner of the inputs'
uncertainty box: the current configuration re-estimated and the candidate, both
from the same snapshot, each input scaled by ``1 +- spread``.

The spread of an input is the relative median absolute deviation of its recent
values at successive decisions (how much it wandered), never below a floor (one
snapshot says nothing about its own noise) and wider while few samples back it.
Pure arithmetic: no clocks, no estimators imported.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from edge_sdk.decision.cost_model import DecisionInputs, LinkEstimate

#: snapshot attribute -> short name used in spreads and reasons
TRACKED: dict[str, str] = {
    "edge_step_ms": "edge",
    "cloud_step_ms": "cloud",
    "uplink_bps": "uplink",
    "downlink_bps": "downlink",
}


@dataclass(frozen=True)
class Uncertainty:
    """Relative uncertainty (0.05 = +-5 %) of each input group of the cost model."""

    edge: float = 0.0
    cloud: float = 0.0
    uplink: float = 0.0
    downlink: float = 0.0

    @property
    def largest(self) -> float:
        return max(self.edge, self.cloud, self.uplink, self.downlink)

    def corners(self) -> Iterator[DecisionInputsScale]:
        """The 16 corners of the box: each input at ``1 - u`` or ``1 + u``."""
        for e, c, u, d in itertools.product((-1, 1), repeat=4):
            yield DecisionInputsScale(1 + e * self.edge, 1 + c * self.cloud, 1 + u * self.uplink, 1 + d * self.downlink)

    def describe(self) -> str:
        return f"edge +-{self.edge:.0%}, cloud +-{self.cloud:.0%}, uplink +-{self.uplink:.0%}, downlink +-{self.downlink:.0%}"

    def to_dict(self) -> dict[str, float]:
        return {"edge": self.edge, "cloud": self.cloud, "uplink": self.uplink, "downlink": self.downlink}


@dataclass(frozen=True)
class DecisionInputsScale:
    """Multipliers for device compute, cloud compute, uplink and downlink bandwidth."""

    edge: float = 1.0
    cloud: float = 1.0
    uplink: float = 1.0
    downlink: float = 1.0

    def apply(self, inputs: DecisionInputs) -> DecisionInputs:
        out = inputs.scale_edge_compute(self.edge) if self.edge != 1.0 else inputs
        if self.edge != 1.0:
            out = replace(out, edge_step_overhead_s=out.edge_step_overhead_s * self.edge)
        if self.cloud != 1.0:
            out = replace(out, blocks=tuple(replace(b, cloud_ms=b.cloud_ms * self.cloud) for b in out.blocks))
        if self.uplink != 1.0 or self.downlink != 1.0:
            link = out.link
            out = replace(
                out,
                link=LinkEstimate(link.uplink_bps * self.uplink, link.downlink_bps * self.downlink, link.rtt_s),
            )
        return out


class SpreadTracker:
    """Remembers the inputs' values at recent decisions and turns them into spreads.

    ``floor``: the least uncertainty ever assumed; ``cap``: the most (beyond it
    the engine would never switch at all); ``window``: decisions remembered;
    ``z``: standard deviations the band spans; ``unknown``: the uncertainty assumed
    while fewer than ``min_values`` values are known (the first decisions, a new
    link): wide enough to ignore small savings, narrow enough that a clearly
    better configuration is taken at once.
    An estimator reset (a link change) clears that input's history, so the
    spread of a new link is judged on the new link alone.
    """

    def __init__(
        self,
        window: int = 8,
        floor: float = 0.05,
        cap: float = 0.35,
        min_values: int = 3,
        z: float = 2.0,
        unknown: float = 0.15,
    ) -> None:
        self.floor = floor
        self.z = z
        self.unknown = unknown
        self.cap = cap
        self.min_values = min_values
        self._values: dict[str, deque[float]] = {name: deque(maxlen=window) for name in TRACKED.values()}
        self._samples: dict[str, int] = {}

    def observe(self, snapshot: Any) -> None:
        samples: Mapping[str, int] = getattr(snapshot, "samples", {}) or {}
        for attr, name in TRACKED.items():
            value = getattr(snapshot, attr, None)
            key = {"edge": "edge_step", "cloud": "cloud_step"}.get(name, name)
            n = samples.get(key)
            if n is not None and n < self._samples.get(key, 0):
                self._values[name].clear()  # the estimator started afresh
            if n is not None:
                self._samples[key] = n
            if value:
                self._values[name].append(float(value))

    def spread(self, name: str) -> float:
        """Relative MAD of ``name``'s recent values, within [floor, cap];
        ``unknown`` while fewer than ``min_values`` are known."""
        values = self._values[name]
        if len(values) < self.min_values:
            return self.unknown
        med = statistics.median(values)
        if med <= 0:
            return self.unknown
        mad = statistics.median(abs(v - med) for v in values)
        # 1.4826 x MAD estimates one standard deviation of a normal spread; z of
        # them cover the next snapshot's value about 95 % of the time (z = 2)
        return min(self.cap, max(self.floor, self.z * 1.4826 * mad / med))

    def uncertainty(self) -> Uncertainty:
        return Uncertainty(**{name: self.spread(name) for name in TRACKED.values()})
