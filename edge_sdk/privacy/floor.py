"""The privacy floor: which (cut point, codec) a run may use, given what was measured.

``--privacy-floor psnr=P`` reads the privacy profile written by ``python -m
edge_sdk privacy`` (``--privacy-profile privacy.json``) and rules out every
(point, codec) whose measured attack PSNR, *with the run's own defence*, is above
``P`` dB. A (point, codec) the profile did not measure with that defence is ruled
out too: no measurement, no claim. ``depth=N`` needs no profile: at least ``N``
blocks stay on the device. Training alone sends no features and is always allowed.

The decision engine gets the result as exclusions with their reasons, so a
reason text can say when privacy, not speed, decided.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import codecs

PROFILE_KIND = "splitreplay-privacy-profile"


@dataclass(frozen=True)
class PrivacyFloor:
    """``max_psnr_db``: the most an inversion attack may rebuild; ``min_depth``: blocks kept on the device."""

    max_psnr_db: float | None = None
    min_depth: int | None = None

    @classmethod
    def parse(cls, text: str) -> PrivacyFloor:
        """``psnr=P``, ``depth=N`` or both joined by ``,``."""
        values: dict[str, Any] = {}
        for part in text.split(","):
            m = re.fullmatch(r"\s*(psnr|depth)\s*=\s*([0-9.eE+-]+)\s*", part)
            if m is None:
                raise ValueError(f"--privacy-floor {text!r}: expected psnr=P (dB) and/or depth=N, e.g. psnr=18 or depth=2")
            key, raw = m.groups()
            try:
                values["max_psnr_db" if key == "psnr" else "min_depth"] = float(raw) if key == "psnr" else int(raw)
            except ValueError:
                raise ValueError(
                    f"--privacy-floor {text!r}: {raw!r} is not a {'number' if key == 'psnr' else 'whole number'}"
                ) from None
        if values.get("min_depth", 0) < 0:
            raise ValueError(f"--privacy-floor {text!r}: depth must be >= 0")
        return cls(**values)

    @property
    def label(self) -> str:
        parts = []
        if self.max_psnr_db is not None:
            parts.append(f"psnr={self.max_psnr_db:g}")
        if self.min_depth is not None:
            parts.append(f"depth={self.min_depth}")
        return ",".join(parts)


@dataclass(frozen=True)
class PrivacyProfile:
    """The attack PSNR per (point, codec, defence) for one model."""

    model: str
    dataset: str
    psnr_db: dict[tuple[int, str, str], float]
    source: str

    @classmethod
    def load(cls, path: str | Path) -> PrivacyProfile:
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"--privacy-profile {p}: no such file (make one with `python -m edge_sdk privacy`)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--privacy-profile {p}: not a readable JSON file ({exc})") from None
        if not isinstance(doc, dict) or doc.get("kind") != PROFILE_KIND:
            raise ValueError(f"--privacy-profile {p}: not a privacy profile (`python -m edge_sdk privacy` writes privacy.json)")
        table: dict[tuple[int, str, str], float] = {}
        try:
            for r in doc["results"]:
                table[(int(r["point"]), codecs.Codec.parse(r["codec"]).label, str(r["defence"]))] = float(r["psnr_db"])
            return cls(model=str(doc["model"]), dataset=str(doc["dataset"]), psnr_db=table, source=str(p))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"--privacy-profile {p}: malformed entry ({exc})") from None


def exclusions(
    floor: PrivacyFloor,
    profile: PrivacyProfile | None,
    *,
    model: str,
    defence: str,
    points: list[int],
    codec_labels: list[str],
    num_blocks: int,
) -> dict[tuple[int, str], str]:
    """(point, codec) -> why the floor rules it out, for every candidate it does."""
    if floor.max_psnr_db is not None:
        if profile is None:
            raise ValueError("--privacy-floor psnr=P needs --privacy-profile privacy.json (from `python -m edge_sdk privacy`)")
        if profile.model != model:
            raise ValueError(
                f"--privacy-profile {profile.source} measured {profile.model}, this run trains {model}: measure this model"
            )
    out: dict[tuple[int, str], str] = {}
    for p in points:
        if p >= num_blocks:
            continue  # training alone: no features leave the device
        for c in codec_labels:
            if floor.min_depth is not None and p < floor.min_depth:
                out[(p, c)] = f"p={p} keeps fewer than {floor.min_depth} blocks on the device"
                continue
            if floor.max_psnr_db is None or profile is None:
                continue
            psnr = profile.psnr_db.get((p, c, defence))
            if psnr is None:
                out[(p, c)] = f"p={p} {c} with defence {defence} was not measured in {profile.source}"
            elif psnr > floor.max_psnr_db:
                out[(p, c)] = f"p={p} {c}: attack PSNR {psnr:.1f} dB > floor {floor.max_psnr_db:g} dB"
    return out
