"""Transposed convolution modules (``nn.ConvTranspose1d/2d/3d``, any groups): output channel
``o = g * (out/groups) + j`` takes a scale in the weight's group-``g`` column ``j`` and the bias; input
channels in the weight's first dimension. The formulas are :mod:`.conv`'s, with ``transposed=True``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.nn.modules.conv import _ConvTransposeNd

from ..graph.graph_queries import ChannelInfo
from .base import ModuleLayerRule
from .conv import scale_conv_module_in, scale_conv_module_out


class DeconvRule(ModuleLayerRule):
    """``nn.ConvTranspose*d``: channels first, both sides take a scale (reported as ``conv``)."""

    name = "deconv"
    kind = "conv"
    takes_input_scale = True

    def accepts(self, module: Any) -> bool:
        return isinstance(module, _ConvTransposeNd)

    def layout(self, module: Any, node: fx.Node) -> ChannelInfo:
        return ChannelInfo(module.out_channels, -(len(module.kernel_size) + 1))

    def scale_output(self, module: Any, v: torch.Tensor) -> None:
        scale_conv_module_out(module, v)

    def input_channels(self, module: Any) -> int:
        return int(module.in_channels)

    def scale_input(self, module: Any, s: torch.Tensor) -> None:
        scale_conv_module_in(module, s)


DECONV = DeconvRule()
