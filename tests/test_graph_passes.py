"""Graph passes before lowering (export/graph_passes.py): same function, fewer copies."""

from __future__ import annotations

import warnings

import pytest
import torch

from export.graph_passes import PRESERVED_OPS, decomposition_table, drop_aliases, mm_transposed_to_linear

aten = torch.ops.aten


def _targets(ep) -> list:
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


class _MmT(torch.nn.Module):
    def forward(self, a, b, c):
        # a @ b.T (-> linear), and a transpose that is not of a 2-D operand's last two dims
        return a @ b.t(), torch.mm(c.permute(1, 0), a)


def test_mm_of_a_transpose_becomes_linear_with_the_same_values():
    a, b, c = torch.randn(6, 5), torch.randn(4, 5), torch.randn(6, 3)
    ep = torch.export.export(_MmT(), (a, b, c), strict=False).run_decompositions(decomposition_table())
    assert mm_transposed_to_linear(ep) == 1  # only the second operand's transpose folds
    targets = _targets(ep)
    assert aten.linear.default in targets and targets.count(aten.mm.default) == 1
    out = ep.module()(a, b, c)
    torch.testing.assert_close(out[0], a @ b.t())
    torch.testing.assert_close(out[1], c.t() @ a)


class _Alias(torch.nn.Module):
    def forward(self, x):
        kept = aten.alias.default(x * 2)  # feeds an output: kept
        used = aten.alias.default(x + 1)  # only feeds an op: dropped
        return kept, used.relu()


def test_aliases_go_except_those_that_are_outputs():
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(_Alias(), (x,), strict=False)
    assert _targets(ep).count(aten.alias.default) == 2
    assert drop_aliases(ep) == 1
    assert _targets(ep).count(aten.alias.default) == 1
    kept, used = ep.module()(x)
    torch.testing.assert_close(kept, x * 2)
    torch.testing.assert_close(used, (x + 1).relu())


@pytest.mark.parametrize("op", PRESERVED_OPS)
def test_preserved_ops_are_left_out_of_the_decomposition_table(op):
    assert op not in decomposition_table()
