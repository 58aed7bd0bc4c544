"""A tqdm progress bar with live loss, accuracy and steps/s."""

from __future__ import annotations

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
        if self.enabled:
            self._bar = tqdm(total=self._total, unit="step", dynamic_ncols=True, mininterval=0.5, desc="training")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, ev: ProgressEvent) -> None:
        if self._bar is None:
            return
        self._bar.set_description(f"epoch {ev.epoch + 1}/{self.cfg.epochs}")
        self._bar.set_postfix(loss=f"{ev.loss:.3f}", acc=f"{100 * ev.accuracy:.1f}%", sps=f"{ev.steps_per_s:.1f}", refresh=False)
        self._bar.update(1)
