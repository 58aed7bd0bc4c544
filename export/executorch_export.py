"""Lower a prepared head to one ExecuTorch ``.pte`` with three methods.

* ``forward(x, *params, *buffers, *masks) -> (features, *new_buffers)``: the step's
  train-mode forward (BatchNorm statistics updated, returned as outputs).
* ``forward_eval(x, *params, *buffers) -> features``.
* ``forward_backward(x, g, *buffers, *masks)``: the joint graph of
  ``sum(head(x) * g)`` from ``torch.export.experimental._export_forward_backward``;
  it owns the parameters as mutable weights and returns ``(loss, *grads, *params)``,
  which :class:`executorch.extension.training.TrainingModule` splits.

Why the forward methods take the parameters as inputs: ExecuTorch methods do not
share weights, so the runtime passes the joint method's (live) weight tensors into
them. One copy of the weights, which a ``torch.optim`` optimizer steps in place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import torch

from export.graph_passes import PRESERVED_OPS, decomposition_table, drop_aliases, mm_transposed_to_linear
from export.program import ForwardEval, ForwardLoss, ForwardTrain, PreparedHead, example_inputs


class UnsupportedOperatorError(RuntimeError):
    """The head uses an operator the target runtime cannot run."""

    def __init__(self, operators: list[str], detail: str = "") -> None:
        self.operators = operators
        msg = "cannot lower the head: operator(s) without a kernel in the ExecuTorch runtime: " + ", ".join(operators)
        super().__init__(msg + (f" ({detail})" if detail else ""))


#: kernels that exist but compute wrong gradients in ExecuTorch 1.5.1 (found by the
#: parity tests); ``export.program`` rewrites the layers that would need them.
KNOWN_WRONG = {"aten::max_pool2d_with_indices_backward.grad_input"}


@contextlib.contextmanager
def _quiet():
    """ExecuTorch's lowering logs a lot at INFO; keep the CLI's progress readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            # deprecation chatter from torch.utils._pytree and the memory planner's
            # "out kwarg is None" notes: not actionable for users of the CLI
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        root.setLevel(level)


def registered_operators() -> set[str]:
    """Operator names (``aten::mm.out``) with a kernel in the Python runtime we ship."""
    from executorch.extension.pybindings import portable_lib

    return set(portable_lib._get_operator_names())


def program_operators(et_program) -> set[str]:
    """Operator names a lowered program calls (``aten::mm.out``)."""
    ops = set()
    for plan in et_program.executorch_program.execution_plan:
        for op in plan.operators:
            ops.add(f"{op.name}.{op.overload}" if op.overload else op.name)
    return ops


def _joint_forward_backward(ep: torch.export.ExportedProgram, table: dict | None) -> torch.export.ExportedProgram:
    """``torch.export.experimental._export_forward_backward`` with a decomposition
    table of our choosing (the experimental API always decomposes to core ATen,
    which breaks up ops ExecuTorch runs faster whole; see :mod:`export.graph_passes`)."""
    from torch.export.experimental import (
        _copy_graph_module_and_signature,
        _decompose_exported_program,
        _export_forward_backward,
        _remove_detach_pass,
    )

    if table is None:
        return _export_forward_backward(ep)
    ep = _decompose_exported_program(
        ep, cia_to_decomp={}, python_decomp_table=table, joint_loss_index=0, decompose_custom_triton_ops=False
    )
    gm, signature = _copy_graph_module_and_signature(ep)
    _remove_detach_pass(gm, signature)
    return ep._update(gm, signature)


def export_methods(prep: PreparedHead, rewrite=None, *, optimize: bool = True) -> dict[str, torch.export.ExportedProgram]:
    """``torch.export`` each method; ``rewrite(ep) -> ep`` runs before lowering.
    ``optimize`` keeps the ops ExecuTorch runs faster whole, puts ``linear`` back
    where decomposition left ``mm(a, b.T)`` and drops ``alias`` copies
    (:mod:`export.graph_passes`)."""
    args = example_inputs(prep)
    eps = {}
    with _quiet():
        eps["forward"] = torch.export.export(ForwardTrain(prep), args["forward"], strict=False)
        eps["forward_eval"] = torch.export.export(ForwardEval(prep), args["forward_eval"], strict=False)
        joint = torch.export.export(ForwardLoss(prep), args["forward_backward"], strict=False)
        eps["forward_backward"] = _joint_forward_backward(joint, decomposition_table() if optimize else None)
    for name, ep in eps.items():
        # Core ATen decomposition makes the two forward methods look like the joint one.
        if name != "forward_backward":
            ep = ep.run_decompositions(decomposition_table()) if optimize else ep.run_decompositions()
        if optimize:
            mm_transposed_to_linear(ep)
            drop_aliases(ep)
        eps[name] = rewrite(ep) if rewrite else ep
    return eps


def lower(eps: dict[str, torch.export.ExportedProgram]) -> bytes:
    """``to_edge(...).to_executorch()``; raises :class:`UnsupportedOperatorError`."""
    from executorch.exir import EdgeCompileConfig, to_edge

    with _quiet():
        try:
            edge = to_edge(eps, compile_config=EdgeCompileConfig(_check_ir_validity=False, preserve_ops=list(PRESERVED_OPS)))
            et = edge.to_executorch()
        except Exception as exc:  # name the operator the lowering choked on
            op = _operator_in(exc)
            if op:
                raise UnsupportedOperatorError([op], str(exc).splitlines()[0]) from exc
            raise
    ops = program_operators(et)
    missing = sorted(ops - registered_operators())
    if missing:
        raise UnsupportedOperatorError(missing)
    wrong = sorted(ops & KNOWN_WRONG)
    if wrong:
        raise UnsupportedOperatorError(wrong, "kernel gives wrong results in this ExecuTorch release")
    buf = io.BytesIO()
    et.write_to_file(buf)
    return buf.getvalue()


def _operator_in(exc: BaseException) -> str | None:
    import re

    m = re.search(r"(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", str(exc))
    return m.group(1) if m else None


def export_executorch(prep: PreparedHead, path: str | os.PathLike, rewrite=None, *, optimize: bool = True) -> bytes:
    """Export ``prep`` and write the ``.pte`` to ``path``; returns the bytes."""
    data = lower(export_methods(prep, rewrite, optimize=optimize))
    with open(path, "wb") as f:
        f.write(data)
    return data
