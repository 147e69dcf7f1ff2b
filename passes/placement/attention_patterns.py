"""Find existing channel attention in a traced graph, by its shape in the graph, not by class name.

The pattern (SE, ECA, EffectiveSE, the SE inside torchvision's MobileNetV3 / EfficientNet / RegNetY)::

    pooled = global_pool(x)                 # AdaptiveAvg/MaxPool to 1, F.adaptive_*_pool(x, 1), x.mean(dims),
                                            #    or a window over the whole map: F.avg_pool2d(x, x.size()[2:]),
                                            #    nn.AvgPool2d(k) where shapes show a 1x1 output
    gate   = sigmoid(F(pooled))             # F: a small network of conv / linear / 1-D conv / activations /
                                            #    reshapes, with parameters, fed by nothing but the pooling
    out    = x * gate                       # (or gate * x; the gate may pass a view/expand_as first)

Found by dataflow, whatever the spelling: the gate may be either operand of the multiply; the
network may flatten (``view(x.size(0), -1)``, ``flatten(1)``, ``reshape(b, -1)``, ``squeeze``)
and expand back (``view(b, c, 1, 1)``, ``[:, :, None, None]``, ``unsqueeze``, ``expand_as``);
its layers may be Linear or 1x1 conv with any activation between them; the gate is a sigmoid or
a hard sigmoid, also spelled out as ``relu6(t + 3) / 6`` (or ``* (1/6)``, ``* 1 / 6``, a clamp to
``[0, 6]``, the in-place ``t.add_(3).clamp_(0, 6).div_(6)``); the expand step may read its sizes from the
gate itself (``out.view(out.size(0), out.size(1), 1, 1)``).

This is a report pass: it returns :class:`ChannelAttention` records and changes nothing.

Refuses (does not report): a gate whose network reads another graph value than the pooled ``x``
(so it is not a function of ``GAP(x)`` alone), a network whose inner values are used outside it
(rewriting it would change another user), a pooling that is not global (output size other than 1),
a network with no parameters (``x * sigmoid(mean(x))`` has nothing to train into a constant), and
networks of more than ``MAX_NETWORK_NODES`` nodes.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .global_pooling import pooled_dims
from ..graph.graph_queries import channel_info, module_of, mul_operands, skip_identity

#: largest attention network (nodes between the pooling and the gate) that still counts as "small"
MAX_NETWORK_NODES = 32

_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_GATE_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.special.expit)
_GATE_METHODS = ("sigmoid", "sigmoid_")
#: shape-only steps allowed between the gate and the multiply
_VIEW_METHODS = ("view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "transpose", "permute", "flatten")
_VIEW_FUNCTIONS = (torch.reshape, torch.unsqueeze, torch.squeeze, torch.transpose, torch.permute, torch.flatten)


@dataclass
class ChannelAttention:
    """One existing channel-attention block: ``mul = feature * act(F(pool(feature)))``.

    Node names: ``mul`` (the multiply), ``gate`` (the sigmoid/hardsigmoid output), ``pool`` (the
    global pooling; ``pools`` lists all of them when the network reads several, as CBAM's channel
    gate does), ``feature`` (the scaled tensor ``x``), ``network`` (the nodes strictly between the
    pooling and the gate, in graph order). ``module``: module path of the attention block (from
    ``nn_module_stack``: the innermost module that holds the multiply, e.g. ``features.1.block.1``
    for torchvision's ``SqueezeExcitation``). ``channels``/``channel_pos``: size of the scaled
    dimension and its position counted from the right (``-3`` for NCHW); ``channels`` is ``0`` where
    it cannot be told without shapes (pass them via shape propagation). ``activation``:
    ``"sigmoid"`` or ``"hardsigmoid"``. ``spatial_dims``: how many trailing dimensions the pooling
    reduces. ``shape_queries``: nodes the network reads that are computed from ``x``'s shape only
    (``b, c = x.size()[:2]`` for ``y.view(b, c)``). ``gate_input``: the value the gate activates
    (the network's output); ``gate_nodes``: the nodes of a gate spelled out in several steps
    (``relu6(t + 3) / 6``: the add and the relu6; the division is ``gate``).
    """

    mul: str
    gate: str
    pool: str
    feature: str
    module: str
    channels: int
    channel_pos: int
    activation: str = "sigmoid"
    gate_input: str = ""
    gate_nodes: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()
    network: tuple[str, ...] = field(default_factory=tuple)
    spatial_dims: int = 2
    shape_queries: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gate_activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    module = module_of(gm, node)
    if module is not None:
        if isinstance(module, nn.Hardsigmoid):
            return "hardsigmoid"
        return "sigmoid" if isinstance(module, nn.Sigmoid) else None
    if node.op == "call_function" and node.target in _GATE_FUNCTIONS:
        return "hardsigmoid" if node.target is F.hardsigmoid else "sigmoid"
    if node.op == "call_method" and node.target in _GATE_METHODS:
        return "sigmoid"
    return None


_DIV_FUNCTIONS = (operator.truediv, torch.div, torch.true_divide)
_RELU6_FUNCTIONS = (F.relu6,)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _over_six(node: fx.Node) -> fx.Node | None:
    """``r`` when ``node`` is ``r / 6`` or ``r * (1/6)`` (either operand order for the multiply)."""
    if node.op == "call_function" and node.target in _DIV_FUNCTIONS and len(node.args) == 2:
        r, d = node.args
        return r if isinstance(r, fx.Node) and _number(d) == 6.0 else None
    operands = mul_operands(node)
    if operands is not None:
        for r, k in (operands, operands[::-1]):
            if isinstance(r, fx.Node) and _number(k) is not None and abs(_number(k) - 1 / 6) < 1e-12:
                return r
    return None


def _plus_three(node: fx.Node) -> fx.Node | None:
    """``t`` when ``node`` is ``t + 3`` or ``3 + t``."""
    if node.op in ("call_function", "call_method") and node.target in (operator.add, torch.add, "add") \
            and len(node.args) == 2 and not node.kwargs:
        for t, k in (node.args, node.args[::-1]):
            if isinstance(t, fx.Node) and _number(k) == 3.0:
                return t
    return None


def _times_one(node: fx.Node) -> fx.Node | None:
    """``r`` when ``node`` is ``r * 1`` (an ``h_max`` of 1: ``relu6(t + 3) * self.h_max / 6``)."""
    operands = mul_operands(node)
    if operands is not None:
        for r, k in (operands, operands[::-1]):
            if isinstance(r, fx.Node) and _number(k) == 1.0:
                return r
    return None


def _is_clamp_0_6(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``relu6(t)``, ``hardtanh(t, 0, 6)``, ``t.clamp(0, 6)`` / ``t.clamp_(0., 6.)``."""
    if isinstance(module_of(gm, node), nn.ReLU6) or (node.op == "call_function" and node.target in _RELU6_FUNCTIONS):
        return True
    bounds = [_number(a) for a in node.args[1:3]] + [_number(node.kwargs.get(k)) for k in ("min", "max")]
    clamps = (node.op == "call_method" and node.target in ("clamp", "clamp_", "clip", "clip_")) or \
        (node.op == "call_function" and node.target in (torch.clamp, torch.clip, F.hardtanh))
    return clamps and [b for b in bounds if b is not None] == [0.0, 6.0]


def _spelled_hardsigmoid(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]] | None:
    """``(t, (t + 3, relu6(t + 3)))`` when ``node`` is ``relu6(t + 3) / 6``: a hard sigmoid of ``t``; also
    ``relu6(t + 3) * 1 / 6``, ``(t + 3).clamp(0, 6) / 6`` and its in-place form ``t.add_(3).clamp_(0, 6).div_(6)``."""
    r = _over_six(node)
    if r is None and node.op == "call_method" and node.target == "div_" and len(node.args) == 2 \
            and _number(node.args[1]) == 6.0 and isinstance(node.args[0], fx.Node):
        r = node.args[0]
    if r is None or len(r.users) != 1:
        return None
    steps: tuple[fx.Node, ...] = ()
    one = _times_one(r)
    if one is not None:
        steps, r = (r,), one
        if len(r.users) != 1:
            return None
    if not _is_clamp_0_6(gm, r) or not isinstance(r.args[0], fx.Node) or len(r.args[0].users) != 1:
        return None
    added = r.args[0]
    t = _plus_three(added)
    if t is None and added.op == "call_method" and added.target == "add_" and len(added.args) == 2 \
            and _number(added.args[1]) == 3.0 and isinstance(added.args[0], fx.Node):
        t = added.args[0]
    return (t, (added, r, *steps)) if t is not None else None


def _activated(gm: fx.GraphModule, node: fx.Node) -> tuple[str, fx.Node, tuple[fx.Node, ...]] | None:
    """``(activation, its input, the gate's inner steps)`` when ``node`` is a sigmoid-like gate."""
    activation = _gate_activation(gm, node)
    if activation is not None and node.args and isinstance(node.args[0], fx.Node):
        return activation, node.args[0], ()
    spelled = _spelled_hardsigmoid(gm, node)
    if spelled is not None:
        return "hardsigmoid", spelled[0], spelled[1]
    return None


_SHAPE_ARITHMETIC = (operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub, getattr)


def is_shape_of(node: fx.Node, feature: fx.Node) -> bool:
    """Whether ``node`` is computed from ``feature``'s shape only (``x.size()``, ``x.shape[1] // 2``, ...)."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return node.args[0] is feature or is_shape_of(node.args[0], feature)  # type: ignore[arg-type]
    if node.op == "call_function" and node.target in _SHAPE_ARITHMETIC:
        if node.target is getattr:
            return node.args[0] is feature and node.args[1] == "shape"
        inputs = node.all_input_nodes
        return bool(inputs) and all(is_shape_of(n, feature) for n in inputs)
    return False


def _only_adds_axes(index: Any) -> bool:
    """An index that selects nothing, only adds axes: ``[:, :, None, None]``, ``[..., None]``."""
    items = index if isinstance(index, tuple) else (index,)
    return any(i is None for i in items) and all(
        i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        return _only_adds_axes(node.args[1])
    return (node.op == "call_method" and node.target in _VIEW_METHODS) or (
        node.op == "call_function" and node.target in _VIEW_FUNCTIONS
    )


def _gate_of(gm: fx.GraphModule, operand: fx.Node, feature: fx.Node
             ) -> tuple[fx.Node, str, fx.Node, tuple[fx.Node, ...]] | None:
    """Walk from a multiply operand back through view/expand steps to a sigmoid-like gate:
    ``(gate, activation, the gate's input, the gate's inner steps)``."""
    node = operand
    for _ in range(8):
        hit = _activated(gm, node)
        if hit is not None:
            return node, hit[0], hit[1], hit[2]
        if not _is_view(node) or not isinstance(node.args[0], fx.Node):
            return None
        # expand_as(x) and view(b, c, 1, 1) with b, c = x.size() read x's shape only: fine; so do sizes read from
        # the gate itself (`out.view(out.size(0), out.size(1), 1, 1)`)
        source = node.args[0]
        extra = [n for n in node.all_input_nodes[1:] if n is not feature and not is_shape_of(n, feature)
                 and not is_shape_of(n, source)]
        if extra:
            return None
        node = node.args[0]
    return None


def _network(gm: fx.GraphModule, gate: fx.Node, feature: fx.Node, gate_input: fx.Node,
             gate_steps: tuple[fx.Node, ...] = ()) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node]] | None:
    """``(pools, network, shape queries)``: the nodes between the global pooling(s) of ``feature`` and
    ``gate_input`` (included), and the queries of ``feature``'s shape they read; ``None`` if it is not that."""
    pools: list[fx.Node] = []
    inner: list[fx.Node] = []
    shapes: list[fx.Node] = []
    stack, seen = [gate_input], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr":
            inner.append(node)
            continue
        if pooled_dims(gm, node) is not None and skip_identity(gm, node.args[0]) is feature:
            pools.append(node)
            continue
        if is_shape_of(node, feature):
            shapes.append(node)
            stack.extend(n for n in node.all_input_nodes if n is not feature)
            continue
        if node.op in ("placeholder", "output") or node is feature:
            return None
        inner.append(node)
        if len(inner) > MAX_NETWORK_NODES:
            return None
        stack.extend(node.all_input_nodes)
    if not pools:
        return None
    allowed = set(inner) | {gate, *gate_steps}
    for node in inner:  # nothing of the network may be used outside it
        if node.op != "get_attr" and any(user not in allowed for user in node.users):
            return None
    has_parameters = any(n.op == "get_attr" for n in inner) or any(
        any(True for _ in m.parameters()) for m in (module_of(gm, n) for n in inner) if m is not None
    )
    if not has_parameters:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return (sorted(pools, key=order.__getitem__), sorted(inner, key=order.__getitem__),
            sorted(shapes, key=order.__getitem__))


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    value = list(stack.values())[-1]
    return str(value[0]) if isinstance(value, tuple) else str(list(stack.keys())[-1])


def _common_module(nodes: list[fx.Node]) -> str:
    paths = [p.split(".") for p in (_module_path(n) for n in nodes) if p]
    if not paths:
        return ""
    prefix = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(prefix), len(p)) and prefix[k] == p[k]:
            k += 1
        prefix = prefix[:k]
    return ".".join(prefix)


def _channels(gm: fx.GraphModule, feature: fx.Node, network: list[fx.Node], channel_pos: int) -> int:
    """The scaled dimension's size: from shapes when recorded, else from the network's first/last layer."""
    shape = getattr(feature.meta.get("tensor_meta"), "shape", None)
    if shape is not None and len(shape) >= -channel_pos:
        return int(shape[channel_pos])
    modules = [m for m in (module_of(gm, n) for n in network) if m is not None]
    for m in modules:  # the first layer reads the pooled channels
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, nn.Conv2d) and m.in_channels > 1:
            return m.in_channels
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            break  # ECA: a 1-D conv over the channel axis (1 in-channel) says nothing of C
    node = feature  # else the layer that produced x, through single-input elementwise steps
    for _ in range(4):
        info = channel_info(gm, node)
        if info is not None:
            return info.channels
        inputs = node.all_input_nodes
        if len(inputs) != 1 or node.op not in ("call_module", "call_function", "call_method"):
            break
        node = inputs[0]
    return 0


def find_channel_attention(gm: fx.GraphModule) -> list[ChannelAttention]:
    """Every ``x * act(F(global_pool(x)))`` in ``gm``, in graph order (a report; ``gm`` is unchanged)."""
    found: list[ChannelAttention] = []
    for mul in gm.graph.nodes:
        operands = mul_operands(mul)
        if operands is None or not all(isinstance(a, fx.Node) for a in operands):
            continue
        for gate_side, feature in (operands[::-1], operands):
            feature = skip_identity(gm, feature)
            hit = _gate_of(gm, gate_side, feature)
            if hit is None:
                continue
            gate, activation, gate_input, gate_steps = hit
            net = _network(gm, gate, feature, gate_input, gate_steps)
            if net is None:
                continue
            pools, inner, shapes = net
            spatial = pooled_dims(gm, pools[0]) or 2
            channel_pos = -(spatial + 1)
            module = _module_path(mul) or _common_module(inner)
            found.append(ChannelAttention(
                mul=mul.name, gate=gate.name, pool=pools[0].name, feature=feature.name, module=module,
                channels=_channels(gm, feature, inner, channel_pos), channel_pos=channel_pos,
                activation=activation, gate_input=gate_input.name, gate_nodes=tuple(n.name for n in gate_steps),
                pools=tuple(p.name for p in pools),
                network=tuple(n.name for n in inner), spatial_dims=spatial, shape_queries=tuple(n.name for n in shapes),
            ))
            break
    return found


__all__ = ["ChannelAttention", "MAX_NETWORK_NODES", "find_channel_attention", "pooled_dims"]
