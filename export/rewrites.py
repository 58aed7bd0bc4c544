"""Graph rewrites applied before lowering (placeholder; see performance work)."""

from __future__ import annotations

import torch


def optimize_for_portable(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    return ep
