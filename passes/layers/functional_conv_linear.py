"""Functional convolutions and linears (``F.conv*d``, ``F.conv_transpose*d``, ``F.linear``) whose weight
(and bias) are ``get_attr`` tensors, parameters or buffers of the model: the same formulas as for the
modules (:mod:`.conv`, :mod:`.linear`), applied to those attributes. Refused where the weight or the bias
is computed in the graph. Not offered as placement sites (placement looks for layer modules).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph.op_tables import CONV_FUNCTIONS, CONV_TRANSPOSE_FUNCTIONS
from .base import (
    LayerMatch,
    LayerRule,
    NoMatch,
    Refusal,
    Target,
    TargetOrRefusal,
    attribute_tensor,
    attribute_values,
    call_arg,
    replace_tensor,
    scale_attribute,
    weight_and_bias,
)
from .conv import conv_weight_in_scaled, conv_weight_out_scaled

_NOT_MINE = NoMatch("not a call of F.conv*d, F.conv_transpose*d or F.linear")


def _is_conv_or_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in CONV_FUNCTIONS or node.target in CONV_TRANSPOSE_FUNCTIONS
                                           or node.target is F.linear)


def _layout(node: fx.Node, w: torch.Tensor) -> tuple[int, int, int, bool]:
    """``(output channels, their position, groups, transposed)`` of a call with weight ``w``."""
    fn = node.target
    groups = int(call_arg(node, 6, "groups", 1)) if fn is not F.linear else 1
    transposed = fn in CONV_TRANSPOSE_FUNCTIONS
    channels = w.shape[1] * groups if transposed else w.shape[0]
    position = -1 if fn is F.linear else -(w.dim() - 1)
    return channels, position, groups, transposed


class FunctionalConvLinearRule(LayerRule):
    """``F.conv*``/``F.conv_transpose*``/``F.linear`` on attribute weights: both sides take a scale."""

    name = "functional_conv_linear"
    is_site = False

    def recognise(self, gm: fx.GraphModule, node: fx.Node) -> LayerMatch | NoMatch:
        if not _is_conv_or_linear(node):
            return _NOT_MINE
        weight = attribute_tensor(gm, call_arg(node, 1, "weight"))
        if weight is None:
            return NoMatch(f"`{node.name}`'s weight is computed in the graph, not a parameter")
        channels, position, _, _ = _layout(node, weight[2])
        return LayerMatch(self, channels, position, "", node.name)

    def output_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        if not _is_conv_or_linear(node):
            return _NOT_MINE
        found = weight_and_bias(gm, node, 1)
        if isinstance(found, Refusal):
            return found
        weight, bias = found
        if weight is None:
            return Refusal(f"`{node.name}`'s weight or bias is computed in the graph, not a parameter")
        w = weight[2]
        channels, position, groups, transposed = _layout(node, w)
        linear = node.target is F.linear

        def apply(v: torch.Tensor) -> None:
            if linear:
                replace_tensor(weight[0], weight[1], w * v.reshape(-1, 1))
            else:
                replace_tensor(weight[0], weight[1], conv_weight_out_scaled(w, v, groups, transposed))
            scale_attribute(bias, v)

        return Target(node.name, "linear" if linear else "conv", channels, position, attribute_values(weight, bias),
                      apply)

    def input_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        if not _is_conv_or_linear(node):
            return _NOT_MINE
        weight = attribute_tensor(gm, call_arg(node, 1, "weight"))
        if weight is None:
            return Refusal(f"`{node.name}`'s weight is computed in the graph, not a parameter")
        w = weight[2]
        if node.target is F.linear:
            return Target(node.name, "next-linear", w.shape[1], -1, [w],
                          lambda s: replace_tensor(weight[0], weight[1], w * s.reshape(1, -1)))
        groups = int(call_arg(node, 6, "groups", 1))
        transposed = node.target in CONV_TRANSPOSE_FUNCTIONS
        channels = w.shape[0] if transposed else w.shape[1] * groups
        return Target(node.name, "next-conv", channels, -(w.dim() - 1), [w],
                      lambda s: replace_tensor(weight[0], weight[1], conv_weight_in_scaled(w, s, groups, transposed)))


FUNCTIONAL_CONV_LINEAR = FunctionalConvLinearRule()
