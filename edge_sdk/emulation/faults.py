"""Link faults for emulation: when the shaping proxy cuts every connection.

``emulate --faults SPEC`` and tests use it to see a run survive drops (the device
re-dials and resumes; see docs/architecture.md, "A dropped connection"). Times
are seconds since the proxy started, the clock network traces use too.

SPEC: ``none``; a comma list of ``cut@T`` (a cut at T) and ``stall@T+D`` (no
delivery either way from T for D seconds, connections kept); ``every:S`` (a cut
every S seconds); ``random:N:SEED[:SPAN]`` (N cuts at times drawn uniformly in
[0, SPAN) seconds, SPAN 60 by default, reproducible from SEED).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultSchedule:
    """Cut times, stalls (start, seconds), and/or a period of cuts."""

    cuts: tuple[float, ...] = ()
    every_s: float | None = None
    stalls: tuple[tuple[float, float], ...] = ()

    def times(self) -> Iterator[float]:
        """Every cut time, in order (endless with a period)."""
        yield from self.cuts
        if self.every_s is not None:
            t = self.every_s
            while True:
                yield t
                t += self.every_s

    def events(self) -> Iterator[tuple[float, float | None]]:
        """(time, stall seconds or None for a cut), in time order."""
        fixed: list[tuple[float, float | None]] = [(t, None) for t in self.cuts]
        fixed += list(self.stalls)
        yield from sorted(fixed, key=lambda e: e[0])
        if self.every_s is not None:
            t = self.every_s
            while True:
                yield t, None
                t += self.every_s


def parse_faults(spec: str) -> FaultSchedule | None:
    """A ``--faults`` value; ``ValueError`` saying what is accepted."""
    text = spec.strip().lower()
    if text in ("", "none"):
        return None
    try:
        if text.startswith("every:"):
            every = float(text[len("every:") :])
            if not every > 0:
                raise ValueError
            return FaultSchedule(every_s=every)
        if text.startswith("random:"):
            parts = text.split(":")[1:]
            n, seed = int(parts[0]), int(parts[1])
            span = float(parts[2]) if len(parts) > 2 else 60.0
            if n < 1 or not span > 0 or len(parts) > 3:
                raise ValueError
            rng = random.Random(seed)
            return FaultSchedule(cuts=tuple(sorted(rng.uniform(0.0, span) for _ in range(n))))
        cuts: list[float] = []
        stalls: list[tuple[float, float]] = []
        for item in text.split(","):
            kind, _, at = item.strip().partition("@")
            if kind == "cut" and float(at) >= 0:
                cuts.append(float(at))
            elif kind == "stall":
                start, _, seconds = at.partition("+")
                if not (float(start) >= 0 and float(seconds) > 0):
                    raise ValueError
                stalls.append((float(start), float(seconds)))
            else:
                raise ValueError
        return FaultSchedule(cuts=tuple(sorted(cuts)), stalls=tuple(sorted(stalls)))
    except (ValueError, IndexError):
        raise ValueError(
            f"--faults {spec!r}: expected none, cut@T and stall@T+D (comma-separated), every:S or random:N:SEED[:SPAN] (seconds)"
        ) from None
