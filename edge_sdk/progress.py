"""What a person watching a run sees: status lines, a progress bar, one line per epoch.

The bar starts at the first training step, not when the object is made: the
device profiles itself and probes the link first (status lines say so), and a bar
whose clock counted that would show a rate and an ETA that are wrong for the whole
first epoch. It shows one rate (tqdm's steps/s), the running train loss and train
accuracy. Each epoch ends with one line, bar or no bar (``--no-progress`` output
is made for log files).
"""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm import tqdm

from edge_sdk.session import ProgressEvent
from edge_sdk.training import TrainConfig


class ProgressBar:
    def __init__(self, cfg: TrainConfig, *, enabled: bool = True, total: int | None = None) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self._bar: tqdm | None = None
        self._total = total

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def status(self, message: str) -> None:
        """A phase before training (profiling, connecting), one line."""
        self._write(message)

    def update(self, ev: ProgressEvent) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=self._total, unit="step", dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        self._bar.set_description(f"epoch {ev.epoch + 1}/{self.cfg.epochs}")
        self._bar.set_postfix_str(f"train loss {ev.loss:.3f}, train acc {100 * ev.accuracy:.1f} %", refresh=False)
        self._bar.update(1)

    def epoch(self, record: dict[str, Any]) -> None:
        """One line per finished epoch (the record of `TrainResult.history`)."""
        self._write(epoch_line(record, self.cfg.epochs))


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    test = record["test_accuracy"]
    tested = f", test acc {100 * test:.2f} %" if not math.isnan(test) else ""
    return (
        f"epoch {record['epoch'] + 1}/{epochs}: train loss {record['train_loss']:.4f}, "
        f"train acc {100 * record['train_accuracy']:.1f} %{tested} ({record['steps']} steps, at {record['wall_s']:.1f} s)"
    )
