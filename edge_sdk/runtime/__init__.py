"""Head runtimes: the code that actually runs the device's blocks.

`HeadRuntime` is the one interface the edge pipeline talks to, so the feature-replay
logic is identical whether the head runs in eager PyTorch, an ExecuTorch program or
a TorchScript program.
"""

from edge_sdk.runtime.base import HeadRuntime
from edge_sdk.runtime.eager import EagerRuntime

__all__ = ["HeadRuntime", "EagerRuntime"]
