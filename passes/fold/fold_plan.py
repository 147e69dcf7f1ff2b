"""Planning a fold: whether a layer takes a scale (:func:`match`), how a scale splits over a channel
``cat`` (:func:`cat_pieces`, :func:`through_cat`), and whether a finished plan would change a dtype
(:func:`dtype_refusal`) or drop a dimension (:func:`rank_refusal`). Shared by :mod:`~asr_fx.passes.fold.fold`
(backward, into the producer) and :mod:`~asr_fx.passes.fold.propagate` (forward, into the next layers); built on
:mod:`~asr_fx.passes.fold.scale_algebra` and the layer registry (:mod:`asr_fx.passes.layers.registry`).

Nothing here changes the graph or a parameter: applying a plan is :mod:`~asr_fx.passes.fold.apply`.
Every answer is a value: a plan or a scale, else a :class:`~asr_fx.passes.graph.refusals.Refusal`
with its reason (or ``NoMatch`` where the question does not apply).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..graph.graph_queries import is_add, output_shape
from ..graph.op_tables import CAT_FUNCTIONS
from ..graph.refusals import NoMatch, Refusal
from ..layers.base import Target, TensorUsage
from ..layers.registry import output_target
from .scale_algebra import Plan, ScaleState, is_reshape, map_through, permuted


def match(target: Target, state: ScaleState, usage: TensorUsage) -> torch.Tensor | Refusal:
    """The 1-D scale for ``target``, or why it cannot take ``state``."""
    v, pos = state.values, state.position
    shared = usage.refusal(target)
    if shared is not None:
        return shared
    if pos is None:
        vec = v.reshape(1).expand(target.channels).clone()
    elif target.position is None:
        return Refusal(f"`{target.label}`'s channel dimension depends on the input rank: pass example_inputs to fuse")
    elif pos != target.position or v.numel() != target.channels:
        return Refusal(f"the scale ({v.numel()} values at dim {pos}) does not lie along `{target.label}`'s "
                       f"{target.channels} channels")
    else:
        vec = v
    if target.dtype is None and v.dtype != torch.get_default_dtype():
        return Refusal(f"the dtype `{target.label}` computes in is unknown (it has no floating parameters) and the "
                       f"scale is {v.dtype}; pass example_inputs to fuse")
    refused = target.refuse(vec)
    return refused if refused is not None else vec


def channels_of(gm: fx.GraphModule, node: fx.Node, pos: int, depth: int = 8) -> int | None:
    """The size of ``node``'s value along dim ``pos``, from recorded shapes or from the layers that made it."""
    shape = output_shape(node)
    if shape is not None:
        return shape[pos] if -len(shape) <= pos < 0 else None
    if depth == 0:
        return None
    target = output_target(gm, node)
    if isinstance(target, Target):
        return target.channels if target.position == pos else None
    if is_add(node):  # a broadcast add has its larger operand's size
        sizes = [channels_of(gm, a, pos, depth - 1) for a in node.args]  # type: ignore[arg-type]
        return None if None in sizes else max(sizes)  # type: ignore[type-var]
    cat = cat_pieces(gm, node, pos, depth - 1)
    if isinstance(cat, tuple) and cat[1] is not None:
        return sum(cat[1])
    moved = map_through(gm, node, ScaleState(torch.ones(()), None), forward=False)
    if isinstance(moved, ScaleState) and permuted(node) is None and not is_reshape(gm, node):
        return channels_of(gm, node.args[0], pos, depth - 1)  # type: ignore[arg-type]
    return None


def cat_operands(node: fx.Node) -> tuple[Any, int]:
    """The tensors and the dim of a ``cat`` call, positional or keyword (``tensors=``, ``dim=``)."""
    pieces = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return pieces, dim if isinstance(dim, int) else 0


def cat_pieces(gm: fx.GraphModule, node: fx.Node, pos: int | None,
               depth: int = 8) -> tuple[list[fx.Node], list[int] | None] | Refusal | NoMatch:
    """The inputs of a ``cat`` along the scaled dim and their sizes there (``None`` sizes: unknown);
    :class:`NoMatch` when ``node`` is no ``cat``, a :class:`Refusal` when it is one a scale cannot pass."""
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS:
        return NoMatch("not a cat")
    pieces, dim = cat_operands(node)
    if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, fx.Node) for p in pieces):
        return Refusal("a cat of non-graph values")
    shape = output_shape(node)
    if pos is not None and dim >= 0:
        if shape is None:
            return Refusal("a cat whose rank is unknown; pass example_inputs to fuse")
        dim -= len(shape)
    if pos is not None and dim != pos:
        return Refusal("a cat along another dimension than the scaled one")
    sizes = [channels_of(gm, p, dim, depth) for p in pieces] if pos is not None else None
    if sizes is not None and None in sizes:
        return Refusal("a cat of pieces of unknown size; pass example_inputs to fuse")
    if shape is not None and sizes is not None and pos is not None and sum(sizes) != shape[pos]:  # type: ignore[arg-type]
        return Refusal("a cat whose pieces' sizes do not add up to its own (a broadcast piece)")
    return list(pieces), sizes  # type: ignore[return-value]


def through_cat(gm: fx.GraphModule, cat: fx.Node, piece: fx.Node, state: ScaleState) -> ScaleState | Refusal:
    """The scale on a channel ``cat`` of the scaled ``piece`` with unscaled others: ones elsewhere."""
    v, pos = state.values, state.position
    _, dim = cat_operands(cat)
    if pos is None:
        shape = output_shape(cat)
        pos = dim if dim < 0 else (dim - len(shape) if shape is not None else None)
        if pos is None:
            return Refusal("the scaled value flows into a cat whose rank is unknown; pass example_inputs to fuse")
    found = cat_pieces(gm, cat, pos)
    if not isinstance(found, tuple):
        why = found.reason if isinstance(found, Refusal) else "which does not commute with a scale"
        return Refusal(f"the scaled value flows into `{cat.name}`, {why}")
    pieces, sizes = found
    if sizes is None:
        return Refusal(f"the scaled value flows into `{cat.name}`, a cat of pieces of unknown size")
    parts = [(v if v.dim() else v.expand(n)) if p is piece else torch.ones(n, dtype=v.dtype)
             for p, n in zip(pieces, sizes)]
    if v.dim() and v.numel() != sizes[pieces.index(piece)]:
        return Refusal(f"the scale does not match `{piece.name}`'s {sizes[pieces.index(piece)]} channels")
    return ScaleState(torch.cat(parts), pos)


def dtype_refusal(c: torch.Tensor, plan: Plan) -> Refusal | None:
    """Why folding the constant ``c`` by ``plan`` would change a dtype, or ``None``: a ``c`` with
    dimensions (even all of size 1) takes part in type promotion, so a float64 ``c`` makes ``x * c``
    float64 where ``x`` is float32, and a fold would return float32 (a 0-dim ``c`` never promotes)."""
    if c.dim() == 0:
        return None
    for target, _ in plan:
        if target.dtype is not None and torch.promote_types(c.dtype, target.dtype) != target.dtype:
            return Refusal(f"the {c.dtype} scale promotes `{target.label}`'s {target.dtype} values to {c.dtype}; "
                           f"folding it would change the output dtype (cast the scale to {target.dtype}, or convert "
                           "the model)")
    return None


def _max_rank(module: object) -> int | None:
    """The largest rank a layer's output (and input) can have, where the layer fixes it."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return len(module.kernel_size) + 2
    for classes, rank in (((nn.BatchNorm1d, nn.InstanceNorm1d), 3), ((nn.BatchNorm2d, nn.InstanceNorm2d), 4),
                          ((nn.BatchNorm3d, nn.InstanceNorm3d), 5)):
        if isinstance(module, classes):
            return rank
    return None


def rank_refusal(c: torch.Tensor, plan: Plan) -> Refusal | None:
    """Why ``x * c`` is no per-channel scale of the planned layers' values: ``c`` has more dimensions than
    they can have, so the multiply adds dimensions (a fold would drop them); ``None`` otherwise."""
    for target, _ in plan:
        rank = _max_rank(target.module)
        if rank is not None and c.dim() > rank:
            return Refusal(f"the scale has {c.dim()} dimensions and `{target.label}`'s values at most {rank}: the "
                           "multiply broadcasts them to a larger shape")
    return None


def plan_refusal(c: torch.Tensor, plan: Plan) -> Refusal | None:
    """Why a finished ``plan`` for the constant ``c`` must not be applied (:func:`dtype_refusal`,
    :func:`rank_refusal`), or ``None``."""
    return dtype_refusal(c, plan) or rank_refusal(c, plan)


def plan_kinds(plan: Plan) -> str:
    """Where a plan puts its scales, as the report says it: ``bn``, ``next-conv+next-linear``, ..."""
    return "+".join(sorted({t.kind for t, _ in plan}))


def plan_labels(plan: Plan) -> str:
    """The layers a plan folds into, comma-separated."""
    return ", ".join(t.label for t, _ in plan)
