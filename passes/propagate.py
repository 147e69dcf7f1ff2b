"""Pass 6, propagate: push a constant per-channel scale that its producer could not take forward,
through ops that commute with it, into the input channels of the next conv/linear/BN.

Equivalence: ``next(op(x * s)) == next'(op(x))`` where ``op`` commutes with the scale:
``op(x * s) == op(x) * s`` (dropout in eval, identity, average pooling, flatten and
channel-preserving reshapes and permutes for any ``s``; ReLU, LeakyReLU and max pooling for
``s >= 0``; ReLU6, Hardtanh and clamp only for ``s == 1``) and ``next'`` has its input channels
scaled (:func:`asr_fx.passes._fold_rules.scale_inputs`; an eval BN takes ``mean/s`` and
``(var + eps)/s^2``). Every user of the scaled value, transitively through those ops, must be such
a layer: if one is not (an add, a model output, GELU, sigmoid, a negative scale through ReLU ...),
nothing changes and the reason is reported.

The scale also goes through a ``cat`` along its channel dimension (the other pieces get a scale
of 1) and through another constant ``mul`` (scales commute).

Refuses too: a next layer called at more than one place or sharing a parameter, an in-place op in
the way while the unscaled value has other users, and reshapes whose shapes are unknown (pass
``example_inputs`` to :func:`asr_fx.fuse`). Modifies ``gm`` in place.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._fold_rules import Target, TensorUsage, in_channels, input_refusal, scale_inputs
from ._patterns import channel_info, is_mul
from .fold_functional import input_target

#: a scale in flight: ``(v, position)``; ``v`` 1-D per channel at ``position`` (counted from the
#: right), or 0-D (the same for every channel) with ``position`` ``None``
State = tuple[torch.Tensor, "int | None"]

_LINEAR, _POSITIVE, _UNIT = "any scale", "scales >= 0", "a scale of exactly 1"
_MODULES: dict[type, tuple[str, int]] = {
    nn.Identity: (_LINEAR, 0), nn.Dropout: (_LINEAR, 0), nn.Dropout1d: (_LINEAR, 0), nn.Dropout2d: (_LINEAR, 0),
    nn.Dropout3d: (_LINEAR, 0), nn.AlphaDropout: (_LINEAR, 0),
    nn.AvgPool1d: (_LINEAR, 1), nn.AvgPool2d: (_LINEAR, 2), nn.AvgPool3d: (_LINEAR, 3),
    nn.AdaptiveAvgPool1d: (_LINEAR, 1), nn.AdaptiveAvgPool2d: (_LINEAR, 2), nn.AdaptiveAvgPool3d: (_LINEAR, 3),
    nn.ReLU: (_POSITIVE, 0), nn.LeakyReLU: (_POSITIVE, 0),
    nn.MaxPool1d: (_POSITIVE, 1), nn.MaxPool2d: (_POSITIVE, 2), nn.MaxPool3d: (_POSITIVE, 3),
    nn.AdaptiveMaxPool1d: (_POSITIVE, 1), nn.AdaptiveMaxPool2d: (_POSITIVE, 2), nn.AdaptiveMaxPool3d: (_POSITIVE, 3),
    nn.ReLU6: (_UNIT, 0), nn.Hardtanh: (_UNIT, 0),
}
_FUNCTIONS: dict[Any, tuple[str, int]] = {
    F.avg_pool1d: (_LINEAR, 1), F.avg_pool2d: (_LINEAR, 2), F.avg_pool3d: (_LINEAR, 3),
    F.adaptive_avg_pool1d: (_LINEAR, 1), F.adaptive_avg_pool2d: (_LINEAR, 2), F.adaptive_avg_pool3d: (_LINEAR, 3),
    F.relu: (_POSITIVE, 0), torch.relu: (_POSITIVE, 0), torch.relu_: (_POSITIVE, 0), F.leaky_relu: (_POSITIVE, 0),
    F.max_pool1d: (_POSITIVE, 1), F.max_pool2d: (_POSITIVE, 2), F.max_pool3d: (_POSITIVE, 3),
    F.adaptive_max_pool1d: (_POSITIVE, 1), F.adaptive_max_pool2d: (_POSITIVE, 2),
    F.adaptive_max_pool3d: (_POSITIVE, 3),
    F.relu6: (_UNIT, 0), F.hardtanh: (_UNIT, 0), torch.clamp: (_UNIT, 0), torch.clip: (_UNIT, 0),
}
_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
_METHODS: dict[str, tuple[str, int]] = {
    "contiguous": (_LINEAR, 0), "clone": (_LINEAR, 0), "relu": (_POSITIVE, 0), "relu_": (_POSITIVE, 0),
    "clamp": (_UNIT, 0), "clip": (_UNIT, 0),
}
_SHAPE_QUERIES = {"size", "dim", "numel", "ndimension"}


def _name(node: fx.Node) -> str:
    if node.op == "call_module" and node.graph.owning_module is not None:
        return f"{node.target} ({type(node.graph.owning_module.get_submodule(str(node.target))).__name__})"
    return getattr(node.target, "__name__", str(node.target))


def _shape(node: Any) -> tuple[int, ...] | None:
    shape = getattr(getattr(node, "meta", {}).get("tensor_meta"), "shape", None)
    return tuple(shape) if shape is not None else None


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes into its input (``relu_``, ``inplace=True``, ``x *= c``...)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.kwargs.get("inplace"):
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return node.op == "call_function" and (getattr(node.target, "__name__", "").endswith("_")
                                           or node.target in (operator.imul, operator.iadd))


def _unary_kind(gm: fx.GraphModule, node: fx.Node) -> tuple[str, int] | str | None:
    """How ``node`` commutes with a scale: ``(condition, pooled trailing dims)``, a refusal, or ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, "return_indices", False):
            return f"`{node.target}` returns indices"
        if module.training and isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                                     nn.AlphaDropout)):
            return f"`{node.target}` is a dropout in training mode"
        if isinstance(module, nn.ReLU6) or type(module) is nn.Hardtanh:
            lo, hi = getattr(module, "min_val", 0.0), getattr(module, "max_val", 6.0)
            return (_POSITIVE, 0) if lo == 0 and math.isinf(hi) else (_UNIT, 0)
        return _MODULES.get(type(module))
    if node.op == "call_function":
        if node.target in _DROPOUTS:
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            return (_LINEAR, 0) if training is False else f"`{_name(node)}` is in training mode"
        if node.target in (torch.clamp, torch.clip):
            return _clamp_kind(node)
        indices_at = 6 if node.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d) else 2
        if "max_pool" in _name(node) and (node.kwargs.get("return_indices")
                                          or len(node.args) > indices_at and node.args[indices_at]):
            return f"`{_name(node)}` returns indices"
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        if node.target in ("clamp", "clip"):
            return _clamp_kind(node)
        return _METHODS.get(str(node.target))
    return None


def _clamp_kind(node: fx.Node) -> tuple[str, int]:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    return (_POSITIVE, 0) if lo == 0 and hi is None else (_UNIT, 0)


def _permuted(node: fx.Node) -> list[int] | None:
    """The ``dims`` of a permute, or of a transpose when its rank is known."""
    if node.target in (torch.permute, "permute"):
        dims = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else node.args[1:2]
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
        if dims and all(isinstance(d, int) for d in dims):
            return [d % len(dims) for d in dims]
        return None
    if node.target in (torch.transpose, "transpose") and len(node.args) == 3:
        shape = _shape(node)
        d0, d1 = node.args[1], node.args[2]
        if shape is None or not isinstance(d0, int) or not isinstance(d1, int):
            return None
        perm = list(range(len(shape)))
        perm[d0 % len(shape)], perm[d1 % len(shape)] = perm[d1 % len(shape)], perm[d0 % len(shape)]
        return perm
    return None


def _is_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (nn.Flatten, nn.Unflatten))
    return node.target in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "flatten", "view",
                           "reshape", "squeeze", "unsqueeze", "unflatten")


def _reshape_forward(before: tuple[int, ...], after: tuple[int, ...], v: torch.Tensor, pos: int) -> State | str:
    """Map a channel dim through a row-major reshape: it keeps its size or is merged with the dims after it."""
    i = len(before) + pos
    outer = math.prod(before[:i])
    channels = before[i]
    prefix = 1
    for j, size in enumerate(after):
        if prefix == outer and size % channels == 0 and size > 0 and math.prod(before[i + 1:]) % (size // channels) == 0 \
                and (size > 1 or channels == 1):
            return v.repeat_interleave(size // channels), j - len(after)
        prefix *= size
    return f"the reshape {before} -> {after} does not keep the {channels} channels together"


def _reshape_backward(before: tuple[int, ...], after: tuple[int, ...], v: torch.Tensor, pos: int) -> State | str:
    """Inverse of :func:`_reshape_forward`: a scale on a merged dim must be constant within each channel."""
    j = len(after) + pos
    outer = math.prod(after[:j])
    size = after[j]
    prefix = 1
    for i, channels in enumerate(before):
        if prefix == outer and channels > 0 and size % channels == 0 and (channels > 1 or size == 1):
            inner = size // channels
            if math.prod(before[i + 1:]) % inner == 0:
                grouped = v.reshape(channels, inner)
                if bool((grouped == grouped[:, :1]).all()):
                    return grouped[:, 0].clone(), i - len(before)
        prefix *= channels
    return f"the reshape {before} -> {after} does not keep the scaled channels together"


def map_through(gm: fx.GraphModule, node: fx.Node, state: State, forward: bool) -> State | str | None:
    """The scale on the other side of ``node``: the state after it (``forward``) or before it.

    Returns ``None`` when ``node`` is not an op a scale moves through, a string when it is one but
    this scale cannot (the reason), else the new state.
    """
    v, pos = state
    perm = _permuted(node)
    if perm is not None:
        if pos is None:
            return state
        rank = len(perm)
        if forward:
            return v, perm.index(rank + pos) - rank
        return v, perm[rank + pos] - rank
    if _is_reshape(gm, node):
        if pos is None:
            return state
        before, after = _shape(node.args[0]), _shape(node)
        if before is None or after is None:
            return f"`{_name(node)}` reshapes a scaled value of unknown shape; pass example_inputs to fuse"
        return _reshape_forward(before, after, v, pos) if forward else _reshape_backward(after, before, v, pos)
    kind = _unary_kind(gm, node)
    if kind is None or isinstance(kind, str):
        return kind
    condition, pooled = kind
    if pooled and pos is not None and pos >= -pooled:
        return f"`{_name(node)}` pools over the scaled dimension"
    if condition == _POSITIVE and bool((v < 0).any()):
        return f"the scale has negative entries, which do not commute with `{_name(node)}`"
    if condition == _UNIT and not bool((v == 1).all()):
        return f"`{_name(node)}` has bounds, which do not commute with a scale"
    return state


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
    return target.refuse(vec) or vec


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


def _constant_mul_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The graph operand of a ``mul`` by a constant (which commutes with any other scale), else ``None``."""
    from .fold import constant_operand

    if not is_mul(node):
        return None
    found = constant_operand(gm, node)
    return found[0] if found is not None else None


def _occurrences(user: fx.Node, node: fx.Node) -> int:
    seen: list[fx.Node] = []
    fx.node.map_arg((user.args, user.kwargs), lambda n: seen.append(n) or n)
    return sum(n is node for n in seen)


def _through_cat(gm: fx.GraphModule, cat: fx.Node, piece: fx.Node, state: State) -> State | str:
    """The scale on a channel ``cat`` of the scaled ``piece`` with unscaled others: ones elsewhere."""
    from .fold import _cat_pieces

    v, pos = state
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if pos is None:
        shape = _shape(cat)
        pos = dim if dim < 0 else (dim - len(shape) if shape is not None else None)
        if pos is None:
            return "the scaled value flows into a cat whose rank is unknown; pass example_inputs to fuse"
    found = _cat_pieces(gm, cat, pos)
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


def _plan_forward(gm: fx.GraphModule, root: fx.Node, state: State, usage: TensorUsage, budget: int = 256):
    """Every layer that must take the scale on ``root``'s value, with its 1-D scale; or the reason."""
    plan: list[tuple[Target, torch.Tensor]] = []
    inplace = False
    stack = [(root, state)]
    while stack:
        node, st = stack.pop()
        for user in node.users:
            budget -= 1
            if budget < 0:
                return "the scaled value reaches too many nodes", False
            if user.op == "call_method" and user.target in _SHAPE_QUERIES or \
                    user.op == "call_function" and user.target is getattr and user.args[1] in ("shape", "dtype"):
                continue
            if user.op == "output":
                return "the scaled value is a model output", False
            if user.op == "call_function" and user.target in (torch.cat, torch.concat) and _occurrences(user, node) == 1:
                moved = _through_cat(gm, user, node, st)
                if isinstance(moved, str):
                    return moved, False
                stack.append((user, moved))
                continue
            if _constant_mul_input(gm, user) is node and _occurrences(user, node) == 1:
                stack.append((user, st))  # another constant scale commutes with this one
                continue
            if not user.args or user.args[0] is not node or _occurrences(user, node) > 1:
                return f"the scaled value flows into `{_name(user)}`, which does not commute with a scale", False
            target = module_input_target(gm, user)
            if target is not None:
                vec = match(target, st, usage)
                if isinstance(vec, str):
                    return vec, False
                plan.append((target, vec))
                continue
            moved = map_through(gm, user, st, forward=True)
            if moved is None:
                return f"the scaled value flows into `{_name(user)}`, which does not commute with a scale", False
            if isinstance(moved, str):
                return moved, False
            inplace = inplace or is_inplace(gm, user)
            stack.append((user, moved))
    if not plan:
        return "the scaled value reaches no conv/linear/BN", False
    return plan, inplace


def propagate_scales(gm: fx.GraphModule, records: list, usage: TensorUsage | None = None) -> fx.GraphModule:
    """Push every constant scale still left as a ``mul`` (per ``records`` from
    :func:`~asr_fx.passes.fold.fold_scales`) into the layers after it; updates the records."""
    from .fold import apply_plan, constant_operand, per_channel_scale

    if all(r.folded for r in records):
        return gm
    usage = usage or TensorUsage(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for record in records:
        if record.folded or record.mul not in nodes:
            continue
        mul = nodes[record.mul]
        operands = constant_operand(gm, mul) if is_mul(mul) else None
        if operands is None:
            continue
        x, c = operands
        state = per_channel_scale(c, mul, x)
        if isinstance(state, str):
            continue
        if is_inplace(gm, mul) and len(x.users) > 1:
            record.reason += "; not pushed forward: an in-place multiply of a value with other users"
            continue
        with torch.no_grad():
            plan, inplace = _plan_forward(gm, mul, (state[0].detach(), state[1]), usage)
        if isinstance(plan, str) or (inplace and len(x.users) > 1):
            why = plan if isinstance(plan, str) else "an in-place op follows while the unscaled value has other users"
            record.reason += f"; not pushed forward: {why}"
            continue
        apply_plan(plan)
        mul.replace_all_uses_with(x)
        gm.graph.erase_node(mul)
        record.where = "+".join(sorted({t.kind for t, _ in plan}))
        record.into = ", ".join(t.label for t, _ in plan)
        record.reason = f"pushed forward ({record.reason})"
    gm.recompile()
    return gm
