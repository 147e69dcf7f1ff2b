"""Convolution modules (``nn.Conv1d/2d/3d``, any groups): output channels take a scale in the weight's
rows and the bias (Eq. 6), input channels in the weight's columns (``conv(x * s) == conv'(x)``).

The raw-weight formulas (:func:`conv_weight_out_scaled`, :func:`conv_weight_in_scaled`) are shared with
transposed convs (:mod:`.deconv`) and the functional forms (:mod:`.functional_conv_linear`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..graph.graph_queries import ChannelInfo
from .base import ModuleLayerRule, replace_tensor


def conv_weight_out_scaled(w: torch.Tensor, v: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    """Eq. 6 on a raw weight: output channel ``o`` scaled by ``v[o]``.

    Conv weights are ``(out, in/groups, *k)``; transposed conv weights are ``(in, out/groups, *k)``
    with output channel ``o = g * (out/groups) + j``.
    """
    k = (1,) * (w.dim() - 2)
    if not transposed:
        return w * v.reshape(-1, 1, *k)
    in_per_group, out_per_group = w.shape[0] // groups, w.shape[1]
    grouped = w.reshape(groups, in_per_group, out_per_group, *w.shape[2:])
    return (grouped * v.reshape(groups, 1, out_per_group, *k)).reshape(w.shape)


def conv_weight_in_scaled(w: torch.Tensor, s: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    """Input channel ``i`` of a conv scaled by ``s[i]``: ``conv(x * s) == conv'(x)``.

    Conv input channel ``i = g * (in/groups) + j`` is column ``j`` of group ``g``'s rows;
    a transposed conv's input channel is its weight's first dimension.
    """
    k = (1,) * (w.dim() - 2)
    if transposed:
        return w * s.reshape(-1, 1, *k)
    out_per_group, in_per_group = w.shape[0] // groups, w.shape[1]
    grouped = w.reshape(groups, out_per_group, in_per_group, *w.shape[2:])
    return (grouped * s.reshape(groups, 1, in_per_group, *k)).reshape(w.shape)


def scale_conv_module_out(conv: Any, v: torch.Tensor) -> None:
    """A conv module's (or transposed conv's) output channels scaled by ``v``: weight and bias."""
    transposed = isinstance(conv, _ConvTransposeNd)
    replace_tensor(conv, "weight", conv_weight_out_scaled(conv.weight, v, conv.groups, transposed))
    if conv.bias is not None:
        replace_tensor(conv, "bias", conv.bias * v)


def scale_conv_module_in(conv: Any, s: torch.Tensor) -> None:
    """A conv module's (or transposed conv's) input channels scaled by ``s``: the weight only."""
    transposed = isinstance(conv, _ConvTransposeNd)
    replace_tensor(conv, "weight", conv_weight_in_scaled(conv.weight, s, conv.groups, transposed))


class ConvRule(ModuleLayerRule):
    """``nn.Conv*d``: channels first (``-(spatial rank + 1)`` from the right), both sides take a scale."""

    name = "conv"
    kind = "conv"
    takes_input_scale = True

    def accepts(self, module: Any) -> bool:
        return isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd)

    def layout(self, module: Any, node: fx.Node) -> ChannelInfo:
        return ChannelInfo(module.out_channels, -(len(module.kernel_size) + 1))

    def scale_output(self, module: Any, v: torch.Tensor) -> None:
        scale_conv_module_out(module, v)

    def input_channels(self, module: Any) -> int:
        return int(module.in_channels)

    def scale_input(self, module: Any, s: torch.Tensor) -> None:
        scale_conv_module_in(module, s)


CONV = ConvRule()
