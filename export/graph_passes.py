"""Passes over an exported graph, after decomposition and before lowering.

Why here and not in :mod:`export.layout`: some fast ExecuTorch kernels are for ops
that decomposition always breaks up. ``aten::linear`` (``a @ b.T``) is one: a
layer or a hand-written backward may ask for it, but tracing the joint graph
decomposes it into ``permute`` + ``mm``, and ExecuTorch's ``mm`` needs both
operands contiguous, so the ``permute`` becomes a ``permute_copy`` (~8 ns per
element in the portable kernel, as much as the product itself for the weight
gradients of 1x1 convolutions). The pass below puts ``linear`` back; the lowering
keeps it whole (``preserve_ops``). Ops that are not composite (``pixel_shuffle``)
only need leaving out of the decomposition table (:func:`decomposition_table`).
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

#: ops kept whole through decomposition and lowering (``EdgeCompileConfig.preserve_ops``):
#: ExecuTorch has kernels for them that beat their decompositions. ``pixel_shuffle``
#: interleaves the phases of a strided convolution's input gradient in one pass
#: (14.0 vs 15.9 ms for 64 x 32 x 34 x 34 by ``stack`` + reshape; ``linear`` 3.9 vs
#: 5.9 ms for (64, 32768) x (16, 32768); ``python bench/export_ops.py --kernels``).
PRESERVED_OPS = (aten.linear.default, aten.pixel_shuffle.default)


def decomposition_table() -> dict:
    """The core-ATen decomposition table without :data:`PRESERVED_OPS`."""
    from torch._decomp import core_aten_decompositions

    table = core_aten_decompositions()
    for op in PRESERVED_OPS:
        table.pop(op, None)
    return table


_TRANSPOSES = {aten.permute.default, aten.t.default, aten.transpose.int}


def _transposed_2d(node: torch.fx.Node) -> torch.fx.Node | None:
    """The operand ``b`` when ``node`` is ``b.T`` of a 2-D ``b``, else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    src = node.args[0]
    val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    if val is None or val.dim() != 2:
        return None
    if node.target is aten.permute.default and list(node.args[1]) != [1, 0]:
        return None
    return src


def _recompiled(gm: torch.fx.GraphModule, changes: int) -> int:
    """Check and regenerate ``gm`` after ``changes`` edits (none: leave it be)."""
    if changes:
        gm.graph.lint()
        gm.recompile()
    return changes


def mm_transposed_to_linear(ep: torch.export.ExportedProgram) -> int:
    """Rewrite ``mm(a, b.T)`` as ``linear(a, b)`` in place; returns how many.

    The transpose node goes when nothing else uses it. Same product, other
    summation order (the parity tests hold programs to 1e-5 relative)."""
    gm = ep.graph_module
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.mm.default:
            continue
        a, bt = node.args
        b = _transposed_2d(bt)
        if b is None:
            continue
        with gm.graph.inserting_before(node):
            lin = gm.graph.call_function(aten.linear.default, (a, b))
        lin.meta.update(node.meta)
        node.replace_all_uses_with(lin)
        gm.graph.erase_node(node)
        if not bt.users:
            gm.graph.erase_node(bt)
        count += 1
    return _recompiled(gm, count)


def drop_aliases(ep: torch.export.ExportedProgram) -> int:
    """Replace ``alias(x)`` by ``x``; returns how many.

    Why: tracing the joint graph wraps tensors a custom backward saved in
    ``aten.alias``, and ExecuTorch lowers every ``alias`` to ``alias_copy``, a full
    copy (1.2 ms for a 64 x 32 x 32 x 32 activation). The graph is functional (no
    op writes into its inputs), so the alias and its source are interchangeable.
    Aliases that feed the graph's outputs are kept: two outputs must not share
    storage in the memory plan."""
    gm = ep.graph_module
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.alias.default:
            continue
        if any(u.op == "output" for u in node.users):
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        count += 1
    return _recompiled(gm, count)
