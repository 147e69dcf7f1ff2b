"""Weight-standardized convolutions with a gain (NF-Nets' ``ScaledStdConv2d``), as torch.fx traces them:

    conv(x, batch_norm(W.reshape(1, O, -1), None, None, weight=g, training=True, momentum=0, eps).reshape_as(W), b)

where ``g`` is computed from a parameter ``gain`` of ``O`` entries by multiplies with numbers and
reshapes (``(gain * scale).view(-1)``). Each output filter is standardized, then multiplied by ``g[o]``.

A per-output-channel scale ``v`` after such a conv commutes into it only after the standardization
(scaling ``W`` itself is undone by it): ``gain' = gain * v``, ``b' = b * v`` is exact. A standardized
conv without a gain (``StdConv2d``: ``weight=None``) cannot take a scale: it is no site and no fold
target. Norm-free networks have no norm layer to put ASR after; the conv that ends each residual
branch is where the paper's placement (after the branch's last layer, before the add) puts it.

:func:`standardized_conv` recognises the pattern by structure (not by module class);
:data:`STANDARDIZED_CONV` is the layer rule placement and the fold pass ask.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph.graph_queries import fetch_attr
from ..graph.op_tables import CONV_FUNCTIONS
from .base import (
    Attribute,
    LayerMatch,
    LayerRule,
    NoMatch,
    Refusal,
    Target,
    TargetOrRefusal,
    attribute_tensor,
    attribute_values,
    call_arg,
    scale_attribute,
)

_RESHAPES = ("view", "reshape", "flatten")
_MULS = (operator.mul, torch.mul)


@dataclass
class StandardizedConv:
    """A recognised weight-standardized conv call: its weight's path, its gain and bias as
    ``(owner module, attribute name, tensor)`` (``bias`` may be ``None``)."""

    weight_path: str
    gain: Attribute
    bias: Attribute | None
    channels: int
    position: int

    @property
    def owner(self) -> str:
        return self.weight_path.rpartition(".")[0]


def _gain(gm: fx.GraphModule, node: Any) -> Attribute | None:
    """The parameter ``g`` is computed from by multiplies with numbers and reshapes, each step used once."""
    while isinstance(node, fx.Node) and node.op != "get_attr":
        if len(node.users) != 1:
            return None
        if node.op == "call_method" and node.target in _RESHAPES:
            node = node.args[0]
        elif node.op == "call_function" and node.target in _MULS and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, fx.Node) and isinstance(b, Number):
                node = a
            elif isinstance(b, fx.Node) and isinstance(a, Number):
                node = b
            else:
                return None
        else:
            return None
    found = attribute_tensor(gm, node)
    return found if found is not None and len(node.users) == 1 else None


def _standardized_weight(gm: fx.GraphModule, node: Any) -> tuple[fx.Node, fx.Node] | None:
    """``(batch_norm node, W get_attr)`` when ``node`` is ``batch_norm(W.reshape(1, O, -1), ...).reshape_as(W)``."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or len(node.users) != 1:
        return None
    if node.target == "reshape_as":
        bn, weight = node.args[0], node.args[1]
    elif node.target in ("reshape", "view") and isinstance(node.args[0], fx.Node):
        bn, weight = node.args[0], None
    else:
        return None
    if not isinstance(bn, fx.Node) or bn.op != "call_function" or bn.target is not F.batch_norm or len(bn.users) != 1:
        return None
    flat = bn.args[0]
    if not isinstance(flat, fx.Node) or flat.op != "call_method" or flat.target not in ("reshape", "view"):
        return None
    source = flat.args[0]
    if weight is not None and source is not weight:
        return None
    found = attribute_tensor(gm, source)
    if found is None:
        return None
    shape = tuple(found[2].shape)
    if weight is None and tuple(node.args[1:]) not in (shape, (shape,)):
        return None
    stats = call_arg(bn, 1, "running_mean"), call_arg(bn, 2, "running_var")
    if any(s is not None for s in stats) or call_arg(bn, 5, "training", False) is not True:
        return None
    if tuple(flat.args[1:]) not in ((1, shape[0], -1), ((1, shape[0], -1),)):
        return None
    return bn, source  # type: ignore[return-value]


def standardized_conv(gm: fx.GraphModule, node: fx.Node) -> StandardizedConv | None:
    """``node`` as a weight-standardized conv with a gain (see the module docstring), else ``None``."""
    if node.op != "call_function" or node.target not in CONV_FUNCTIONS:
        return None
    found = _standardized_weight(gm, call_arg(node, 1, "weight"))
    if found is None:
        return None
    bn, weight = found
    if call_arg(bn, 4, "bias") is not None:
        return None
    gain = _gain(gm, call_arg(bn, 3, "weight"))
    w = fetch_attr(gm, str(weight.target))
    if gain is None or gain[2].numel() != w.shape[0]:
        return None  # no gain (StdConv2d): a scale cannot fold into the conv
    bias_arg = call_arg(node, 2, "bias")
    bias = attribute_tensor(gm, bias_arg)
    if bias_arg is not None and (bias is None or len(bias_arg.users) != 1):
        return None
    return StandardizedConv(str(weight.target), gain, bias, int(w.shape[0]), -(w.dim() - 1))


_NOT_MINE = NoMatch("not a weight-standardized conv with a gain")


class StandardizedConvRule(LayerRule):
    """A weight-standardized conv with a gain: channels first; the output takes a scale in the gain and
    bias; the input takes none (the standardization undoes a scale of the weight)."""

    name = "standardized_conv"

    def recognise(self, gm: fx.GraphModule, node: fx.Node) -> LayerMatch | NoMatch:
        conv = standardized_conv(gm, node)
        if conv is None:
            return _NOT_MINE
        return LayerMatch(self, conv.channels, conv.position, conv.owner, conv.owner)

    def output_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        """The fold target of ``conv(x) * v``: ``gain * v`` and ``bias * v``."""
        conv = standardized_conv(gm, node)
        if conv is None:
            return _NOT_MINE
        gain, bias = conv.gain, conv.bias

        def apply(v: torch.Tensor) -> None:
            scale_attribute(gain, v.reshape(gain[2].shape))
            scale_attribute(bias, v)

        return Target(node.name, "conv", conv.channels, conv.position, attribute_values(gain, bias), apply)

    def input_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        if standardized_conv(gm, node) is None:
            return _NOT_MINE
        return Refusal("a weight-standardized conv's standardization undoes a scale on its input channels")


STANDARDIZED_CONV = StandardizedConvRule()
