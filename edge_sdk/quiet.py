"""Keep third-party noise out of the command lines' output.

Why a switch and not a filter in library code: the tests must still see every
warning (a deprecation there is a task), while a user of ``train``/``emulate``/
``serve`` should read only this project's lines. So the CLIs call
`quiet_third_party` at start-up, and the ExecuTorch loader wraps its native calls
in `native_stderr_captured`, which captures only after that call (and shows what it
captured if the call fails).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

_quiet = False

#: loggers that report on their own install, not on this run (torchao's optional
#: kernels, torch's pytree registrations)
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torch._export", "torch.export")


def quiet_third_party() -> None:
    """Silence known third-party start-up chatter for the rest of the process."""
    global _quiet
    _quiet = True
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|executorch|torchao|copyreg)(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torch|executorch|torchao)(\.|$)")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[None]:
    """After `quiet_third_party`: hold what native code writes to fd 2 (ExecuTorch's
    cpuinfo probing) and drop it, unless the block raises."""
    if not _quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
