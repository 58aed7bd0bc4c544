"""Block models: an ordered list of blocks and the partition points between them.

Why this shape: a partition point is only real where exactly one tensor flows
from the head (blocks ``[0, p)``, on the device) to the tail (blocks ``[p, L)``,
in the cloud). A :class:`BlockModel` makes that explicit: every block takes one
tensor and returns one tensor, and :attr:`BlockModel.cut_points` lists the
``p`` at which the model may be split.

Naming contract: the full model's state dict uses ``blocks.<i>.<...>``. The
modules returned by :meth:`BlockModel.head` and :meth:`BlockModel.tail` use the
*same* names (they hold the blocks in a ``ModuleDict`` keyed by the global block
index), so ``head(p).state_dict()`` and ``tail(p).state_dict()`` partition the
full state dict exactly and moving the cut moves named tensors one to one.
:meth:`head_name_map` / :meth:`tail_name_map` return that (identity) mapping for
runtimes that take a ``name_map``.

Three constructors:

* :meth:`BlockModel.from_sequential` - each child of an ``nn.Sequential`` is a block;
* ``BlockModel(blocks=[...])`` - explicit blocks;
* :meth:`BlockModel.from_module` - trace an arbitrary ``nn.Module`` with
  ``torch.fx`` and find its single-tensor cut points automatically.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["BlockModel", "BlockSlice", "find_fx_cut_points"]


class BlockSlice(nn.Module):
    """Blocks ``[start, stop)`` of a :class:`BlockModel`, applied in order.

    The blocks are the *same* module objects as in the full model (parameters are
    shared, not copied) and are registered under their global index, so state-dict
    keys are identical to the full model's (``blocks.<i>.<...>``).
    An empty slice is the identity.
    """

    def __init__(self, blocks: Sequence[nn.Module], start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.blocks = nn.ModuleDict({str(i): blocks[i] for i in range(start, stop)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return x

    def extra_repr(self) -> str:
        return f"start={self.start}, stop={self.stop}"


class BlockModel(nn.Module):
    """An ordered list of single-tensor blocks with their valid partition points.

    Args:
        blocks: the blocks, applied in order; each maps one tensor to one tensor.
        cut_points: the valid partition points ``p`` (``0 <= p <= L``). ``0`` and
            ``L`` are always added. Default: every block boundary.
        block_names: optional human-readable names (profiles, logs).
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        cut_points: Iterable[int] | None = None,
        block_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(list(blocks))
        n = len(self.blocks)
        if n == 0:
            raise ValueError("BlockModel needs at least one block")
        points = set(range(n + 1)) if cut_points is None else {int(p) for p in cut_points}
        bad = sorted(p for p in points if not 0 <= p <= n)
        if bad:
            raise ValueError(f"cut points {bad} out of range 0..{n}")
        self._cut_points = sorted(points | {0, n})
        if block_names is not None and len(block_names) != n:
            raise ValueError(f"got {len(block_names)} block names for {n} blocks")
        self.block_names = list(block_names) if block_names is not None else [type(b).__name__ for b in self.blocks]

    # ------------------------------------------------------------------ basics
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def cut_points(self) -> list[int]:
        return list(self._cut_points)

    @property
    def interior_points(self) -> list[int]:
        """The cuts that split the model: a non-empty head and a non-empty tail."""
        return [p for p in self._cut_points if 0 < p < self.num_blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def check_point(self, p: int) -> int:
        """Return ``p`` if it is a valid partition point, else raise ``ValueError``
        naming the valid ones."""
        if isinstance(p, bool) or not isinstance(p, int):
            raise ValueError(f"partition point must be an int, got {p!r}; valid points: {self._cut_points}")
        if not 0 <= p <= self.num_blocks:
            raise ValueError(f"partition point {p} is out of range 0..{self.num_blocks}; valid points: {self._cut_points}")
        if p not in self._cut_points:
            raise ValueError(
                f"partition point {p} is not a cut point (more than one tensor crosses it); valid points: {self._cut_points}"
            )
        return p

    def head(self, p: int) -> BlockSlice:
        """Blocks ``[0, p)``: the device side. Shares parameters with this model."""
        self.check_point(p)
        return BlockSlice(self.blocks, 0, p)

    def tail(self, p: int) -> BlockSlice:
        """Blocks ``[p, L)``: the cloud side. Shares parameters with this model."""
        self.check_point(p)
        return BlockSlice(self.blocks, p, self.num_blocks)

    def segment(self, start: int, stop: int) -> BlockSlice:
        """Blocks ``[start, stop)``, e.g. the middle part of a U-shaped placement."""
        self.check_point(start)
        self.check_point(stop)
        if start > stop:
            raise ValueError(f"segment start {start} > stop {stop}")
        return BlockSlice(self.blocks, start, stop)

    # ------------------------------------------------------------- name maps
    def _names(self, start: int, stop: int) -> dict[str, str]:
        sl = BlockSlice(self.blocks, start, stop)
        names = [k for k, _ in sl.named_parameters()] + [k for k, _ in sl.named_buffers()]
        return {k: k for k in names}

    def head_name_map(self, p: int) -> dict[str, str]:
        """Local parameter/buffer name in ``head(p)`` -> name in the full model.

        The identity by construction (see the module docstring); provided so a
        runtime can take a ``name_map`` without knowing that.
        """
        self.check_point(p)
        return self._names(0, p)

    def tail_name_map(self, p: int) -> dict[str, str]:
        """Local parameter/buffer name in ``tail(p)`` -> name in the full model."""
        self.check_point(p)
        return self._names(p, self.num_blocks)

    def head_param_names(self, p: int) -> list[str]:
        """Full-model names of the parameters that live on the device at ``p``."""
        self.check_point(p)
        return [k for k, _ in BlockSlice(self.blocks, 0, p).named_parameters()]

    def tail_param_names(self, p: int) -> list[str]:
        """Full-model names of the parameters that live in the cloud at ``p``."""
        self.check_point(p)
        return [k for k, _ in BlockSlice(self.blocks, p, self.num_blocks).named_parameters()]

    def block_state_names(self, start: int, stop: int) -> list[str]:
        """Full-model state-dict keys of blocks ``[start, stop)`` (what migrates when
        the cut moves from ``start`` to ``stop`` or back)."""
        return list(BlockSlice(self.blocks, min(start, stop), max(start, stop)).state_dict().keys())

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_sequential(cls, seq: nn.Sequential, cut_points: Iterable[int] | None = None) -> BlockModel:
        """Each child of ``seq`` becomes one block (same module objects)."""
        if not isinstance(seq, nn.Sequential):
            raise TypeError(f"from_sequential needs an nn.Sequential, got {type(seq).__name__}")
        names = list(seq._modules.keys())
        return cls(list(seq.children()), cut_points=cut_points, block_names=names)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        example_input: torch.Tensor,
        *,
        merge_parameter_free: bool = True,
        leaf_modules: tuple[type[nn.Module], ...] = (),
    ) -> BlockModel:
        """Trace an arbitrary single-input ``nn.Module`` and split it at every point
        where exactly one tensor crosses.

        Why FX rather than ``torch.export``: an FX ``GraphModule`` keeps the original
        submodules (and so their parameters, by reference, under their original
        names), which is what a trainable, migratable block needs; ``torch.export``
        lifts parameters into graph inputs.

        A gap between two graph nodes is a cut point when (1) exactly one value
        defined before it is used after it, (2) that value is a tensor (checked by
        running ``example_input`` through the graph), and (3) no submodule or
        parameter is used on both sides (shared weights cannot be split).
        With ``merge_parameter_free`` (default) a block without parameters (a ReLU,
        a pooling, a flatten) is folded into the block before it, so blocks are
        "a layer and its activation" rather than single ops.

        The result's state-dict keys are ``blocks.<i>.<original qualified name>``
        and its parameters are the original module's tensors (no copy).
        """
        tracer = _LeafTracer(leaf_modules)
        try:
            graph = tracer.trace(module)
        except Exception as exc:  # data-dependent control flow etc.
            raise ValueError(
                f"could not trace {type(module).__name__} with torch.fx ({exc}); "
                "build the BlockModel from an explicit block list instead"
            ) from exc
        gm = fx.GraphModule(module, graph)
        was_training = module.training
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        module.train(was_training)
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(f"from_module supports single-input modules, got {len(placeholders)} inputs")
        gaps = find_fx_cut_points(gm)
        # segments between consecutive gaps; gaps index "after node i"
        segments = [nodes[a + 1 : b + 1] for a, b in zip(gaps[:-1], gaps[1:])]
        if merge_parameter_free:
            segments = _merge_parameter_free(gm, segments)
        blocks: list[nn.Module] = []
        names: list[str] = []
        for seg in segments:
            block, name = _segment_module(module, gm, seg)
            blocks.append(block)
            names.append(name)
        model = cls(blocks, block_names=names)
        model.train(was_training)
        return model


# ---------------------------------------------------------------- FX helpers
class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


def _node_resources(node: fx.Node) -> set[str]:
    """Submodules/attributes a node touches (for the shared-weight check)."""
    if node.op in ("call_module", "get_attr"):
        return {str(node.target)}
    return set()


def find_fx_cut_points(gm: fx.GraphModule) -> list[int]:
    """Indices ``i`` into ``gm.graph.nodes`` such that cutting after node ``i``
    leaves exactly one tensor crossing. The first entry is the placeholder (the
    raw input, ``p = 0``) and the last is the node producing the output.
    Requires ``ShapeProp`` metadata on the nodes."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    out_idx = next(i for i, n in enumerate(nodes) if n.op == "output")
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    # resources: first and last node index using each submodule/attr
    first_res: dict[str, int] = {}
    last_res: dict[str, int] = {}
    for n in nodes:
        for r in _node_resources(n):
            first_res.setdefault(r, index[n])
            last_res[r] = index[n]
    gaps: list[int] = []
    for i in range(out_idx):
        live = [n for n in nodes[: i + 1] if last_use[n] > i and n.op != "get_attr"]
        if len(live) != 1:
            continue
        meta = live[0].meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            continue  # tuple or non-tensor value crosses
        if any(first_res[r] <= i < last_res[r] for r in first_res):
            continue  # a weight is used on both sides
        if any(n.op == "get_attr" and index[n] <= i and last_use[n] > i for n in nodes):
            continue
        gaps.append(i)
    # the last gap must be the one before the output node (the full model)
    if not gaps or gaps[-1] != out_idx - 1:
        gaps.append(out_idx - 1)
    return gaps


def _module_has_params(gm: fx.GraphModule, seg: list[fx.Node]) -> bool:
    for n in seg:
        if n.op == "call_module" and any(True for _ in gm.get_submodule(str(n.target)).parameters()):
            return True
        if n.op == "get_attr":
            return True
    return False


def _merge_parameter_free(gm: fx.GraphModule, segments: list[list[fx.Node]]) -> list[list[fx.Node]]:
    merged: list[list[fx.Node]] = []
    pending: list[fx.Node] = []  # parameter-free prefix before the first parametric block
    for seg in segments:
        if _module_has_params(gm, seg) or not merged:
            if not merged and not _module_has_params(gm, seg):
                pending.extend(seg)
                continue
            merged.append(pending + seg)
            pending = []
        else:
            merged[-1] = merged[-1] + seg
    if pending:  # a model with no parameters at all
        merged.append(pending)
    return merged


def _segment_module(root: nn.Module, gm: fx.GraphModule, seg: list[fx.Node]) -> tuple[fx.GraphModule, str]:
    """Build a one-input, one-output GraphModule running the nodes of ``seg``."""
    seg_set = set(seg)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = {a for n in seg for a in n.all_input_nodes if a not in seg_set}
    inputs = {a for a in inputs if a.op != "get_attr"}
    if len(inputs) != 1:  # cannot happen for gaps from find_fx_cut_points
        raise AssertionError(f"segment has {len(inputs)} inputs")
    (src,) = inputs
    env[src] = graph.placeholder("x")
    for n in seg:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = graph.node_copy(a, lambda m: env[m])
        env[n] = graph.node_copy(n, lambda m: env[m])
    outs = [n for n in seg if any(u not in seg_set for u in n.users)]
    if len(outs) != 1:  # cannot happen for gaps from find_fx_cut_points
        raise AssertionError(f"segment has {len(outs)} outputs")
    graph.output(env[outs[0]])
    graph.lint()
    block = fx.GraphModule(root, graph, class_name="TracedBlock")
    mods = [str(n.target) for n in seg if n.op == "call_module"]
    return block, _segment_name(mods, seg)


def _segment_name(mods: list[str], seg: list[fx.Node]) -> str:
    """ "layer1.0" for a segment whose modules all live under layer1.0, else
    "first..last" module, else the first node's name."""
    if not mods:
        return str(seg[0].name)
    if len(mods) == 1:
        return mods[0]
    parts = [m.split(".") for m in mods]
    prefix: list[str] = []
    for comps in zip(*parts):
        if len(set(comps)) != 1:
            break
        prefix.append(comps[0])
    return ".".join(prefix) if prefix else f"{mods[0]}..{mods[-1]}"
