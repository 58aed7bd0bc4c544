"""The decision engine: a pure cost model (docs/design.md §1) and swappable policies.

``cost_model`` answers "how long would (point, codec, K) take here?";
``policy`` answers "what should we run next, and should we switch?".
Neither does I/O: the pipeline feeds them profiles and ``edge_sdk.context``
snapshots and acts on the returned :class:`Decision`.
"""

from .cost_model import (
    BlockCost,
    Choice,
    DecisionInputs,
    LinkEstimate,
    Prediction,
    StageTimes,
    apply_context,
    inputs_from_profile,
    migration_time,
    min_staleness_to_fill,
    pipeline_time,
    predict,
)
from .policy import CostModelPolicy, Decision, FixedPolicy, Policy

__all__ = [
    "BlockCost",
    "Choice",
    "CostModelPolicy",
    "Decision",
    "DecisionInputs",
    "FixedPolicy",
    "LinkEstimate",
    "Policy",
    "Prediction",
    "StageTimes",
    "apply_context",
    "inputs_from_profile",
    "migration_time",
    "min_staleness_to_fill",
    "pipeline_time",
    "predict",
]
