"""Link faults for emulation: when the shaping proxy cuts every connection.

``emulate --faults SPEC`` and tests use it to see a run survive drops (the device
re-dials and resumes; see docs/architecture.md, "A dropped connection"). Times
are seconds since the proxy started, the clock network traces use too.

SPEC: ``none``; ``cut@T[,cut@T...]`` (a cut at each time); ``every:S`` (a cut
every S seconds); ``random:N:SEED[:SPAN]`` (N cuts at times drawn uniformly in
[0, SPAN) seconds, SPAN 60 by default, reproducible from SEED).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultSchedule:
    """Cut times (sorted), and/or a period after the last of them."""

    cuts: tuple[float, ...] = ()
    every_s: float | None = None

    def times(self) -> Iterator[float]:
        """Every cut time, in order (endless with a period)."""
        yield from self.cuts
        if self.every_s is not None:
            t = self.every_s
            while True:
                yield t
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
        cuts = []
        for item in text.split(","):
            kind, _, at = item.strip().partition("@")
            if kind != "cut" or float(at) < 0:
                raise ValueError
            cuts.append(float(at))
        return FaultSchedule(cuts=tuple(sorted(cuts)))
    except (ValueError, IndexError):
        raise ValueError(
            f"--faults {spec!r}: expected none, cut@T[,cut@T...], every:S or random:N:SEED[:SPAN] (seconds)"
        ) from None
