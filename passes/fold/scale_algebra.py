"""The scale algebra both fold passes share: what a per-channel constant is, how it moves through ops.

A scale in flight is a :data:`State` ``(v, position)``: ``v`` 1-D with one entry per channel at
``position`` (the dimension counted from the right), or 0-D (the same for every channel) with
``position`` ``None``. This module answers, without changing the graph:

- which ``mul`` multiplies a graph value by a constant, and that constant as a ``State``
  (:func:`constant_operand`, :func:`per_channel_scale`);
- what the scale is on the other side of an op (:func:`map_through`): ops that commute with it
  (:data:`~asr_fx.passes.graph.op_tables.COMMUTING_MODULES` and friends, with their condition on the scale),
  permutes, and row-major reshapes that keep the channels together.

Which layer takes the scale, and applying it, is :mod:`~asr_fx.passes.fold.fold_plan`. Nothing here
changes a graph or a parameter.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch import nn

from .fold_targets import Target
from ..graph.graph_queries import fetch_attr, is_adapted_constant, mul_operands, node_label, output_shape, reads_only_metadata
from ..graph.op_tables import (ADAPTER_METHODS, ANY_SCALE, COMMUTING_FUNCTIONS, COMMUTING_METHODS,
                        COMMUTING_MODULES, DROPOUT_FUNCTIONS, DROPOUT_MODULES, MAX_POOL_INDICES_AT_6,
                        META_ATTRIBUTES, NON_NEGATIVE_SCALE, PERMUTE_TARGETS, RESHAPE_MODULES, RESHAPE_TARGETS,
                        TRANSPOSE_TARGETS, UNIT_SCALE)

#: a scale in flight: ``(v, position)``; ``v`` 1-D per channel at ``position`` (counted from the
#: right), or 0-D (the same for every channel) with ``position`` ``None``
State = tuple[torch.Tensor, "int | None"]
#: the layers that take a scale, each with its 1-D scale
Plan = list[tuple[Target, torch.Tensor]]


# --- the constant operand of a multiply --------------------------------------------------------------

def _reads_only_meta_of(arg: object, x: fx.Node) -> bool:
    """``arg`` is ``x`` itself, ``x.dtype``/``x.device``/``x.shape``, or a literal."""
    if not isinstance(arg, fx.Node):
        return True
    return arg is x or (arg.op == "call_function" and arg.target is getattr and arg.args[0] is x
                        and arg.args[1] in META_ATTRIBUTES)


def adapted_constant(node: object, x: fx.Node) -> fx.Node | None:
    """The ``get_attr`` ``c`` when ``node`` is ``c.expand_as(x)``, ``c.type_as(x)`` or ``c.to(x.dtype)``:
    in ``x * node`` these only adapt ``c`` to ``x`` (broadcasting and the layer's dtype do the same)."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target in ADAPTER_METHODS):
        return None
    c = node.args[0]
    if not (isinstance(c, fx.Node) and c.op == "get_attr"):
        return None
    rest = [*node.args[1:], *node.kwargs.values()]
    return c if all(_reads_only_meta_of(a, x) for a in rest) else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_tensor_value(x: fx.Node) -> bool:
    """Whether ``x`` may be a tensor (not a shape, a size or a number computed from them)."""
    if reads_only_metadata(x) or x.op == "get_attr":
        return False
    if x.op == "call_function" and x.target is operator.getitem and isinstance(x.args[0], fx.Node) \
            and reads_only_metadata(x.args[0]):
        return False
    recorded = x.meta.get("type")
    return recorded is None or isinstance(recorded, type) and issubclass(recorded, torch.Tensor)


def constant_operand(gm: fx.GraphModule, mul: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """``(x, c)`` for a multiply (any spelling, :func:`~asr_fx.passes.graph.graph_queries.mul_operands`) of a
    graph value by a ``get_attr`` tensor (or by ``c.expand_as(x)``, ``c.type_as(x)``,
    ``c.to(x.dtype)``), or by a Python number (a 0-dim scale), else ``None``."""
    operands = mul_operands(mul)
    if operands is None:
        return None
    a, b = operands
    for x, c in ((a, b), (b, a)):
        if not isinstance(x, fx.Node) or not _is_tensor_value(x):
            continue
        if _is_number(c):
            return x, torch.tensor(float(c))
        c = adapted_constant(c, x) or c
        if isinstance(c, fx.Node) and c.op == "get_attr":
            value = fetch_attr(gm, str(c.target))
            if isinstance(value, torch.Tensor):
                return x, value
    return None


def constant_node(mul: fx.Node, x: fx.Node) -> fx.Node | None:
    """The ``get_attr`` node of the constant that ``mul`` multiplies ``x`` by (``None`` for a number)."""
    operands = mul_operands(mul) or (None, None)
    c = operands[1] if operands[0] is x else operands[0]
    c = adapted_constant(c, x) or c
    return c if isinstance(c, fx.Node) else None


def constant_mul_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The graph operand of a ``mul`` by a constant (which commutes with any other scale), else ``None``."""
    found = constant_operand(gm, node)
    return found[0] if found is not None else None


def per_channel_scale(c: torch.Tensor, mul: fx.Node, x: fx.Node) -> State | str:
    """``c`` as a :data:`State`, or why it is not per-channel."""
    if not c.is_floating_point():
        return f"scale has dtype {c.dtype}, not floating point"
    before, after = output_shape(x), output_shape(mul)
    if before is not None and (c.dim() > len(before) or (after is not None and after != before)):
        return f"scale of shape {tuple(c.shape)} broadcasts the value to a larger shape"
    c = c.detach()
    big = [i for i, s in enumerate(c.shape) if s != 1]
    if not big:
        return c.reshape(()), None
    if len(big) > 1:
        return f"scale of shape {tuple(c.shape)} varies along more than one dimension"
    return c.reshape(-1), big[0] - c.dim()


def is_value_use(node: fx.Node) -> bool:
    """Whether a use reads the values (not only shape/dtype, nor adapts a constant to them)."""
    return not (reads_only_metadata(node) or is_adapted_constant(node))


def other_users(node: fx.Node, user: fx.Node) -> list[fx.Node]:
    """Users of ``node`` besides ``user`` that read its values."""
    return [u for u in node.users if u is not user and is_value_use(u)]


# --- through one op ----------------------------------------------------------------------------------

def permuted(node: fx.Node) -> list[int] | None:
    """The ``dims`` of a permute, or of a transpose when its rank is known."""
    if node.target in PERMUTE_TARGETS:
        dims = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else node.args[1:2]
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
        if dims and all(isinstance(d, int) for d in dims):
            return [d % len(dims) for d in dims]
        return None
    if node.target in TRANSPOSE_TARGETS and len(node.args) == 3:
        shape = output_shape(node)
        d0, d1 = node.args[1], node.args[2]
        if shape is None or not isinstance(d0, int) or not isinstance(d1, int):
            return None
        perm = list(range(len(shape)))
        perm[d0 % len(shape)], perm[d1 % len(shape)] = perm[d1 % len(shape)], perm[d0 % len(shape)]
        return perm
    return None


def is_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), RESHAPE_MODULES)
    return node.target in RESHAPE_TARGETS


def reshape_forward(before: tuple[int, ...], after: tuple[int, ...], v: torch.Tensor, pos: int) -> State | str:
    """Map a channel dim through a row-major reshape: it keeps its size or is merged with the dims after it."""
    if not -len(before) <= pos < 0 or before[pos] != v.numel():
        return f"the scale ({v.numel()} values at dim {pos}) does not lie along the reshape's input {before}"
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


def reshape_backward(before: tuple[int, ...], after: tuple[int, ...], v: torch.Tensor, pos: int) -> State | str:
    """Inverse of :func:`reshape_forward`: a scale on a merged dim must be constant within each channel."""
    if not -len(after) <= pos < 0 or after[pos] != v.numel():
        return f"the scale ({v.numel()} values at dim {pos}) does not lie along the reshape's output {after}"
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


def _clamp_kind(node: fx.Node) -> tuple[str, int]:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    return (NON_NEGATIVE_SCALE, 0) if lo == 0 and hi is None else (UNIT_SCALE, 0)


def commuting_kind(gm: fx.GraphModule, node: fx.Node) -> tuple[str, int] | str | None:
    """How ``node`` commutes with a scale: ``(condition, pooled trailing dims)``, a refusal, or ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, "return_indices", False):
            return f"`{node.target}` returns indices"
        if module.training and isinstance(module, DROPOUT_MODULES):
            return f"`{node.target}` is a dropout in training mode"
        if isinstance(module, nn.ReLU6) or type(module) is nn.Hardtanh:
            lo, hi = getattr(module, "min_val", 0.0), getattr(module, "max_val", 6.0)
            return (NON_NEGATIVE_SCALE, 0) if lo == 0 and math.isinf(hi) else (UNIT_SCALE, 0)
        return COMMUTING_MODULES.get(type(module))
    if node.op == "call_function":
        if node.target in DROPOUT_FUNCTIONS:
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            return (ANY_SCALE, 0) if training is False else f"`{node_label(node)}` is in training mode"
        if node.target in (torch.clamp, torch.clip):
            return _clamp_kind(node)
        indices_at = 6 if node.target in MAX_POOL_INDICES_AT_6 else 2
        if "max_pool" in node_label(node) and (node.kwargs.get("return_indices")
                                               or len(node.args) > indices_at and node.args[indices_at]):
            return f"`{node_label(node)}` returns indices"
        return COMMUTING_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        if node.target in ("clamp", "clip"):
            return _clamp_kind(node)
        return COMMUTING_METHODS.get(str(node.target))
    return None


def map_through(gm: fx.GraphModule, node: fx.Node, state: State, forward: bool) -> State | str | None:
    """The scale on the other side of ``node``: the state after it (``forward``) or before it.

    Returns ``None`` when ``node`` is not an op a scale moves through, a string when it is one but
    this scale cannot (the reason), else the new state.
    """
    v, pos = state
    perm = permuted(node)
    if perm is not None:
        if pos is None:
            return state
        rank = len(perm)
        if forward:
            return v, perm.index(rank + pos) - rank
        return v, perm[rank + pos] - rank
    if is_reshape(gm, node):
        if pos is None:
            return state
        before, after = output_shape(node.args[0]), output_shape(node)
        if before is None or after is None:
            return f"`{node_label(node)}` reshapes a scaled value of unknown shape; pass example_inputs to fuse"
        return reshape_forward(before, after, v, pos) if forward else reshape_backward(before, after, v, pos)
    kind = commuting_kind(gm, node)
    if kind is None or isinstance(kind, str):
        return kind
    condition, pooled = kind
    if pooled and pos is not None and pos >= -pooled:
        return f"`{node_label(node)}` pools over the scaled dimension"
    if condition == NON_NEGATIVE_SCALE and bool((v < 0).any()):
        return f"the scale has negative entries, which do not commute with `{node_label(node)}`"
    if condition == UNIT_SCALE and not bool((v == 1).all()):
        return f"`{node_label(node)}` has bounds, which do not commute with a scale"
    return state
