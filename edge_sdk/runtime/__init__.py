"""Head runtimes: the code that actually runs the device's blocks.

`HeadRuntime` is the one interface the edge pipeline talks to, so the feature-replay
logic is identical whether the head runs in eager PyTorch, an ExecuTorch program or
a TorchScript program. The program runtimes import executorch lazily (it is heavy):
get them through :func:`load_runtime`.
"""

from edge_sdk.runtime.base import HeadRuntime
from edge_sdk.runtime.eager import EagerRuntime
from edge_sdk.runtime.loading import PROGRAM_RUNTIMES, load_runtime
from edge_sdk.runtime.program import ManifestError, ShortBatchError, load_manifest

RUNTIMES = ("eager", *PROGRAM_RUNTIMES)

__all__ = [
    "PROGRAM_RUNTIMES",
    "RUNTIMES",
    "EagerRuntime",
    "HeadRuntime",
    "ManifestError",
    "ShortBatchError",
    "load_manifest",
    "load_runtime",
]
