"""Linear modules (``nn.Linear``): output features take a scale in the weight's rows and the bias
(Eq. 12), input features in the weight's columns. Features are the last dimension."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..graph.graph_queries import ChannelInfo
from .base import ModuleLayerRule, replace_tensor


def scale_linear_out(linear: Any, v: torch.Tensor) -> None:
    """Eq. 12: rows of ``W`` and entries of ``b`` scaled."""
    replace_tensor(linear, "weight", linear.weight * v.reshape(-1, 1))
    if linear.bias is not None:
        replace_tensor(linear, "bias", linear.bias * v)


class LinearRule(ModuleLayerRule):
    """``nn.Linear``: features last, both sides take a scale."""

    name = "linear"
    kind = "linear"
    takes_input_scale = True

    def accepts(self, module: Any) -> bool:
        return isinstance(module, nn.Linear)

    def layout(self, module: Any, node: fx.Node) -> ChannelInfo:
        return ChannelInfo(module.out_features, -1)

    def scale_output(self, module: Any, v: torch.Tensor) -> None:
        scale_linear_out(module, v)

    def input_channels(self, module: Any) -> int:
        return int(module.in_features)

    def scale_input(self, module: Any, s: torch.Tensor) -> None:
        replace_tensor(module, "weight", module.weight * s.reshape(1, -1))


LINEAR = LinearRule()
