"""Scaled dot-product attention (``F.scaled_dot_product_attention``): its output
``softmax(q k^T / sqrt(d) + mask) v`` is linear in the value ``v``, so a scale on the output's last dimension
(the value features of each head, ``(..., L, Ev)``) is a scale on ``v``'s last dimension, and folds into the
value projection's output rows (Eq. 13): each row of the linear that made ``v`` is scaled by the entry of the
head feature it becomes. The value is read back from the sdpa call through reshapes, permutes, transposes,
``unbind`` and integer indexing to an ``nn.Linear`` or ``F.linear`` on parameters (a separate value
projection, or the value third of a fused ``qkv`` projection); which row becomes which head feature is found
by replaying those ops on the rows' indices at the recorded shapes.

Refused: without recorded shapes (pass ``example_inputs`` to fuse); a value that is not such a projection; a
value (or a tensor on the way) that something else reads, unless that reader is an indexing that selects
other rows (the query and key of a fused ``qkv``); a row that would take two different entries; a value that
is also the call's query or key. Attention weights, mask, dropout, ``scale``, causality and grouped heads
do not matter: they act on the weights that multiply ``v``. The input takes no scale. Not offered as a
placement site (placement looks for layer modules).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph.graph_queries import output_shape, reads_only_metadata
from .base import FunctionalLayerRule, NoMatch, Refusal, Target, TargetOrRefusal, call_arg
from .functional_conv_linear import FUNCTIONAL_CONV_LINEAR
from .guards import layer_refusal
from .linear import LINEAR

SDPA_FUNCTIONS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_NOT_MINE = NoMatch("not a call of F.scaled_dot_product_attention")
#: the ops a value goes through between its projection and the sdpa call (only their layout changes)
_LAYOUT_METHODS = ("view", "reshape", "permute", "transpose", "contiguous", "unbind")
_LAYOUT_FUNCTIONS = (torch.reshape, torch.permute, torch.transpose, torch.unbind, operator.getitem)
_MAX_STEPS = 12


def _is_layout_op(node: fx.Node) -> bool:
    """A reshape, permute, transpose, ``unbind`` or indexing whose arguments (the first aside) hold no graph
    values (a reshape's sizes may: it is replayed at its recorded shape)."""
    if node.op == "call_method" and node.target in _LAYOUT_METHODS:
        reshape = node.target in ("view", "reshape")
    elif node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS:
        reshape = node.target is torch.reshape
    else:
        return False
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    rest: list[Any] = []
    fx.node.map_arg((node.args[1:], node.kwargs), rest.append)
    return reshape or not rest


def _replay(node: fx.Node, value: Any) -> Any:
    """What layout op ``node`` makes of ``value`` (its first operand); ``None`` where a reshape's shape is
    not recorded."""
    if node.target in ("view", "reshape", torch.reshape):
        shape = output_shape(node)
        return None if shape is None else value.reshape(shape)
    if node.target == "contiguous":
        return value
    if node.target is operator.getitem:
        return value[node.args[1]]
    if node.op == "call_method":
        return getattr(value, str(node.target))(*node.args[1:], **node.kwargs)
    return node.target(value, *node.args[1:], **node.kwargs)  # type: ignore[operator]


def _projection(gm: fx.GraphModule, node: fx.Node) -> Target | Refusal | NoMatch:
    """The output target of a linear (module or ``F.linear`` on parameters) at ``node``."""
    for rule in (LINEAR, FUNCTIONAL_CONV_LINEAR):
        found = rule.output_target(gm, node)
        if isinstance(found, Target) and found.kind == "linear":
            why = layer_refusal(found.module) if node.op == "call_module" else None
            return Refusal(f"`{found.label}`: {why.reason}") if why is not None else found
        if isinstance(found, Refusal):
            return found
    return NoMatch("not a linear")


def _value_path(gm: fx.GraphModule, value: fx.Node) -> tuple[Target, fx.Node, list[fx.Node]] | Refusal:
    """The value's projection, its node, and the layout ops from it to ``value`` (in graph order)."""
    path: list[fx.Node] = []
    node = value
    for _ in range(_MAX_STEPS):
        found = _projection(gm, node)
        if isinstance(found, Target):
            return found, node, path[::-1]
        if isinstance(found, Refusal):
            return found
        if not _is_layout_op(node):
            break
        path.append(node)
        node = node.args[0]  # type: ignore[assignment]
    return Refusal(f"the value `{value.name}` is no linear projection reshaped into heads")


def _row_features(gm: fx.GraphModule, node: fx.Node) -> tuple[Target, torch.Tensor, int] | Refusal:
    """The value projection of sdpa call ``node`` and, for each of its output rows, the value feature (last
    dimension of the value and the sdpa output) it becomes, or -1 for a row the value does not read; and the
    number of value features."""
    value = call_arg(node, 2, "value")
    if not isinstance(value, fx.Node):
        return Refusal(f"`{node.name}`'s value is no graph value")
    if value in (call_arg(node, 0, "query"), call_arg(node, 1, "key")) or \
            any(u is not node and not reads_only_metadata(u) for u in value.users):
        return Refusal(f"`{node.name}`'s value `{value.name}` is also read elsewhere; scaling it would change that")
    found = _value_path(gm, value)
    if isinstance(found, Refusal):
        return found
    target, proj, path = found
    shape = output_shape(proj)
    if shape is None or output_shape(value) is None:
        return Refusal(f"`{node.name}`'s value layout is unknown: pass example_inputs to fuse")
    if shape[-1] != target.channels:
        return Refusal(f"`{target.label}`'s output features are not its last dimension")
    rows = torch.arange(target.channels).expand(shape)
    others: list[torch.Tensor] = []  # the rows other readers on the way select
    current: Any = rows  # a tensor of row indices, or a tuple of them after an unbind
    here = proj
    for step in path:
        for user in here.users:
            if user is step or reads_only_metadata(user):
                continue
            if not (user.op == "call_function" and user.target is operator.getitem and _is_layout_op(user)):
                return Refusal(f"`{here.name}`, on the way from `{target.label}` to `{node.name}`'s value, is also "
                               f"read by `{user.name}`; scaling it would change that")
            others.append(torch.as_tensor(current[user.args[1]]).reshape(-1))
        current, here = _replay(step, current), step
        if current is None:
            return Refusal(f"`{step.name}`'s shape is unknown: pass example_inputs to fuse")
    if not isinstance(current, torch.Tensor) or tuple(current.shape) != output_shape(value):
        return Refusal(f"the rows of `{target.label}` do not replay to the shape of `{node.name}`'s value")
    features = torch.arange(current.shape[-1]).expand(current.shape)
    feature_of = torch.full((target.channels,), -1, dtype=torch.long)
    feature_of[current.reshape(-1)] = features.reshape(-1)
    if not bool((feature_of[current] == features).all()):
        return Refusal(f"a row of `{target.label}` becomes two value features of `{node.name}`")
    if others and bool((feature_of[torch.cat(others)] >= 0).any()):
        return Refusal(f"rows of `{target.label}` that become `{node.name}`'s value are read elsewhere too")
    return target, feature_of, int(current.shape[-1])


def _rows_scale(feature_of: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The scale of each projection row: ``v`` of the feature it becomes, 1 for rows the value does not read."""
    read = feature_of >= 0
    rows = torch.ones(feature_of.numel(), dtype=v.dtype, device=v.device)
    rows[read] = v[feature_of[read].to(v.device)]
    return rows


class SdpaRule(FunctionalLayerRule):
    """``F.scaled_dot_product_attention``: value features last; the output takes a scale in the value
    projection's rows."""

    name = "sdpa"

    def output_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        if node.op != "call_function" or node.target not in SDPA_FUNCTIONS:
            return _NOT_MINE
        found = _row_features(gm, node)
        if isinstance(found, Refusal):
            return found
        proj, feature_of, channels = found
        return Target(proj.label, "sdpa-value", channels, -1, proj.tensors,
                      lambda v: proj.apply(_rows_scale(feature_of, v)), proj.module,
                      refuse=lambda v: proj.refuse(_rows_scale(feature_of, v)), dtype=proj.dtype)


SDPA = SdpaRule()
