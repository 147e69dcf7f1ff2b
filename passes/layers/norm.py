"""Group, instance, layer and RMS norm modules (``nn.GroupNorm``, ``nn.InstanceNorm*d``, ``nn.LayerNorm``,
``nn.RMSNorm``; a library's RMS norm becomes one at capture, :mod:`asr_fx.passes.capture.rms_norm_modules`):
the output takes a scale in the affine (Eq. 7/11, train mode too); the input takes none (the
normalization undoes it). :func:`scale_norm_affine` is shared with BatchNorm (:mod:`.batch_norm`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..graph.graph_queries import ChannelInfo, output_rank
from .base import ModuleLayerRule, replace_tensor


def scale_norm_affine(norm: Any, v: torch.Tensor) -> None:
    """Eq. 7/11: ``gamma' = gamma * v``, ``beta' = beta * v`` (train mode too).

    A norm without an affine gets ``gamma = v`` as a buffer (and ``beta = 0`` for BN), so the
    parameter count does not change; the exported ONNX op is the same either way
    (BatchNormalization, InstanceNormalization and LayerNormalization always carry a scale; the
    GroupNorm decomposition already has its Mul/Add), which the fold target tests check.
    """
    last_dim = isinstance(norm, (nn.LayerNorm, nn.RMSNorm))
    if last_dim:
        v = v.reshape((1,) * (len(norm.normalized_shape) - 1) + (-1,))
    weight = getattr(norm, "weight", None)
    if weight is None:
        if "weight" in norm._parameters:
            del norm._parameters["weight"]
        norm.register_buffer("weight", v.expand(norm.normalized_shape).clone() if last_dim
                             else v.detach().clone())
        if isinstance(norm, _BatchNorm):
            if "bias" in norm._parameters:
                del norm._parameters["bias"]
            norm.register_buffer("bias", torch.zeros_like(v))
        if hasattr(norm, "affine"):
            norm.affine = True
        if hasattr(norm, "elementwise_affine"):
            norm.elementwise_affine = True
        return
    replace_tensor(norm, "weight", weight * v)
    if getattr(norm, "bias", None) is not None:
        replace_tensor(norm, "bias", norm.bias * v)


def channels_first(node: fx.Node) -> int | None:
    """The channel dimension of a channels-first output counted from the right (``None``: rank unknown)."""
    rank = output_rank(node)
    return None if rank is None else 1 - rank


class NormRule(ModuleLayerRule):
    """``nn.GroupNorm``/``nn.InstanceNorm*d`` (channels first), ``nn.LayerNorm`` and ``nn.RMSNorm`` (last
    dimension; RMS norm has no bias): the output takes a scale, the input none."""

    name = "norm"
    kind = "norm"

    def accepts(self, module: Any) -> bool:
        return isinstance(module, (nn.GroupNorm, _InstanceNorm, nn.LayerNorm, nn.RMSNorm))

    def layout(self, module: Any, node: fx.Node) -> ChannelInfo:
        if isinstance(module, nn.InstanceNorm2d):
            return ChannelInfo(module.num_features, -3)
        if isinstance(module, nn.InstanceNorm3d):
            return ChannelInfo(module.num_features, -4)
        if isinstance(module, _InstanceNorm):
            return ChannelInfo(module.num_features, channels_first(node))
        if isinstance(module, nn.GroupNorm):
            return ChannelInfo(module.num_channels, channels_first(node))
        return ChannelInfo(module.normalized_shape[-1], -1)

    def scale_output(self, module: Any, v: torch.Tensor) -> None:
        scale_norm_affine(module, v)


NORM = NormRule()
