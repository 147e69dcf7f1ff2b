"""Planning a fold: which layer takes a scale at a node, how a scale splits over a channel ``cat``,
and applying the finished plan. Shared by :mod:`~asr_fx.passes.fold.fold` (backward, into the producer)
and :mod:`~asr_fx.passes.fold.propagate` (forward, into the next layers); built on
:mod:`~asr_fx.passes.fold.scale_algebra` and :mod:`~asr_fx.passes.fold.fold_targets`.

Nothing here changes the graph or a parameter except :func:`apply_plan` and :func:`fold_mul`.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .fold_targets import Target, TensorUsage, in_channels, input_refusal, scale_inputs, scale_outputs
from .functional_fold_targets import input_target, output_target
from ..graph.graph_queries import channel_info, is_add, output_dtype, output_shape
from ..graph.op_tables import CAT_FUNCTIONS
from .scale_algebra import Plan, State, is_reshape, map_through, permuted


def producer_target(gm: fx.GraphModule, node: fx.Node) -> Target | None:
    """The layer whose output ``node`` is, as a fold target, or ``None``; a layer without floating
    parameters (a norm without affine) computes in the recorded dtype of ``node``."""
    target = _producer_target(gm, node)
    if target is not None and target.dtype is None:
        target.dtype = output_dtype(node)
    return target


def _producer_target(gm: fx.GraphModule, node: fx.Node) -> Target | None:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        found = None if isinstance(module, nn.MultiheadAttention) else scale_outputs(module)
        info = channel_info(gm, node)
        if found is None or info is None:
            return None
        kind, apply, tensors = found
        return Target(str(node.target), kind, info.channels, info.position, tensors, apply, module)
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        mha_node = node.args[0]
        if isinstance(mha_node, fx.Node) and mha_node.op == "call_module":
            mha = gm.get_submodule(str(mha_node.target))
            if isinstance(mha, nn.MultiheadAttention):
                kind, apply, tensors = scale_outputs(mha)  # type: ignore[misc]
                return Target(f"{mha_node.target}.out_proj", kind, mha.embed_dim, -1, tensors, apply, mha)
        return None
    return output_target(gm, node)


def module_input_target(gm: fx.GraphModule, node: fx.Node) -> Target | None:
    """The target that folds a scale on the input of a conv/linear/BN call (module or functional)."""
    if node.op != "call_module":
        return input_target(gm, node)
    module = gm.get_submodule(str(node.target))
    found = scale_inputs(module)
    if found is None:
        return None
    kind, apply, tensors = found
    info = channel_info(gm, node)
    position = -1 if isinstance(module, nn.Linear) else (info.position if info else None)
    return Target(str(node.target), kind, in_channels(module), position, tensors, apply, module,
                  refuse=lambda s: input_refusal(module, s))


def match(target: Target, state: State, usage: TensorUsage) -> torch.Tensor | str:
    """The 1-D scale for ``target``, or why it cannot take ``state``."""
    v, pos = state
    why = usage.refusal(target)
    if why:
        return why
    if pos is None:
        vec = v.reshape(1).expand(target.channels).clone()
    elif target.position is None:
        return f"`{target.label}`'s channel dimension depends on the input rank: pass example_inputs to fuse"
    elif pos != target.position or v.numel() != target.channels:
        return f"the scale ({v.numel()} values at dim {pos}) does not lie along `{target.label}`'s {target.channels} channels"
    else:
        vec = v
    if target.dtype is None and v.dtype != torch.get_default_dtype():
        return (f"the dtype `{target.label}` computes in is unknown (it has no floating parameters) and the "
                f"scale is {v.dtype}; pass example_inputs to fuse")
    return target.refuse(vec) or vec


def channels_of(gm: fx.GraphModule, node: fx.Node, pos: int, depth: int = 8) -> int | None:
    """The size of ``node``'s value along dim ``pos``, from recorded shapes or from the layers that made it."""
    shape = output_shape(node)
    if shape is not None:
        return shape[pos] if -len(shape) <= pos < 0 else None
    if depth == 0:
        return None
    target = producer_target(gm, node)
    if target is not None:
        return target.channels if target.position == pos else None
    if is_add(node):
        return channels_of(gm, node.args[0], pos, depth - 1)  # type: ignore[arg-type]
    cat = cat_pieces(gm, node, pos, depth - 1)
    if isinstance(cat, tuple) and cat[1] is not None:
        return sum(cat[1])
    moved = map_through(gm, node, (torch.ones(()), None), forward=False)
    if isinstance(moved, tuple) and permuted(node) is None and not is_reshape(gm, node):
        return channels_of(gm, node.args[0], pos, depth - 1)  # type: ignore[arg-type]
    return None


def cat_pieces(gm: fx.GraphModule, node: fx.Node, pos: int | None,
               depth: int = 8) -> tuple[list[fx.Node], list[int] | None] | str | None:
    """The inputs of a ``cat`` along the scaled dim and their sizes there (``None`` sizes: unknown);
    ``None`` when ``node`` is no ``cat``, a string when it is one a scale cannot pass."""
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS:
        return None
    pieces = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, fx.Node) for p in pieces):
        return "a cat of non-graph values"
    shape = output_shape(node)
    if pos is not None and dim >= 0:
        if shape is None:
            return "a cat whose rank is unknown; pass example_inputs to fuse"
        dim -= len(shape)
    if pos is not None and dim != pos:
        return "a cat along another dimension than the scaled one"
    sizes = [channels_of(gm, p, dim, depth) for p in pieces] if pos is not None else None
    if sizes is not None and None in sizes:
        return "a cat of pieces of unknown size; pass example_inputs to fuse"
    return list(pieces), sizes


def through_cat(gm: fx.GraphModule, cat: fx.Node, piece: fx.Node, state: State) -> State | str:
    """The scale on a channel ``cat`` of the scaled ``piece`` with unscaled others: ones elsewhere."""
    v, pos = state
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if pos is None:
        shape = output_shape(cat)
        pos = dim if dim < 0 else (dim - len(shape) if shape is not None else None)
        if pos is None:
            return "the scaled value flows into a cat whose rank is unknown; pass example_inputs to fuse"
    found = cat_pieces(gm, cat, pos)
    if not isinstance(found, tuple):
        return f"the scaled value flows into `{cat.name}`, {found or 'which does not commute with a scale'}"
    pieces, sizes = found
    if sizes is None:
        return f"the scaled value flows into `{cat.name}`, a cat of pieces of unknown size"
    parts = [(v if v.dim() else v.expand(n)) if p is piece else torch.ones(n, dtype=v.dtype)
             for p, n in zip(pieces, sizes)]
    if v.dim() and v.numel() != sizes[pieces.index(piece)]:
        return f"the scale does not match `{piece.name}`'s {sizes[pieces.index(piece)]} channels"
    return torch.cat(parts), pos


def dtype_refusal(c: torch.Tensor, plan: Plan) -> str | None:
    """Why folding the constant ``c`` by ``plan`` would change a dtype, or ``None``: a ``c`` with
    dimensions (even all of size 1) takes part in type promotion, so a float64 ``c`` makes ``x * c``
    float64 where ``x`` is float32, and a fold would return float32 (a 0-dim ``c`` never promotes)."""
    if c.dim() == 0:
        return None
    for target, _ in plan:
        if target.dtype is not None and torch.promote_types(c.dtype, target.dtype) != target.dtype:
            return (f"the {c.dtype} scale promotes `{target.label}`'s {target.dtype} values to {c.dtype}; "
                    f"folding it would change the output dtype (cast the scale to {target.dtype}, or convert the model)")
    return None


def plan_kinds(plan: Plan) -> str:
    """Where a plan puts its scales, as the report says it: ``bn``, ``next-conv+next-linear``, ..."""
    return "+".join(sorted({t.kind for t, _ in plan}))


def plan_labels(plan: Plan) -> str:
    """The layers a plan folds into, comma-separated."""
    return ", ".join(t.label for t, _ in plan)


def apply_plan(plan: Plan) -> None:
    """Fold each 1-D scale into its target, cast to the target's dtype (where that is unknown,
    :func:`match` let only a scale in the default dtype through)."""
    with torch.no_grad():
        for target, vec in plan:
            target.apply(vec.to(target.dtype) if target.dtype is not None else vec)


def fold_mul(gm: fx.GraphModule, plan: Plan, c: torch.Tensor, mul: fx.Node, x: fx.Node) -> Plan | str:
    """Finish a fold of ``mul = x * c``: unless :func:`dtype_refusal` refuses it (then nothing changes
    and the reason is returned), apply ``plan`` and drop ``mul`` (its users read ``x``); returns ``plan``."""
    promoted = dtype_refusal(c, plan)
    if promoted:
        return promoted
    apply_plan(plan)
    mul.replace_all_uses_with(x)
    gm.graph.erase_node(mul)
    return plan
