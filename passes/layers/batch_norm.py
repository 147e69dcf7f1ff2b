"""BatchNorm modules (``nn.BatchNorm*d``, ``nn.SyncBatchNorm``): the output takes a scale in the affine
(Eq. 7, train mode too; a BN without affine gets one as buffers); the input of an eval-mode BN with
running statistics takes a scale in them: ``mean' = mean / s``, ``var' + eps = (var + eps) / s^2``,
``gamma' = gamma * sign(s)``, computed in float64 and refused where the cast values would not be exact,
where a scale entry is 0, and for a BN that uses batch statistics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..graph.graph_queries import ChannelInfo
from ..graph.refusals import Refusal
from .base import ModuleLayerRule, replace_tensor
from .norm import channels_first, scale_norm_affine


def bn_statistics_for_input_scale(bn: Any, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean / s, (var + eps) / s^2 - eps)`` computed in float64, cast to the buffers' dtype."""
    s64, eps = s.detach().double(), bn.eps
    mean = bn.running_mean.double() / s64
    var = (bn.running_var.double() + eps) / (s64 * s64) - eps
    return mean.to(bn.running_mean.dtype), var.to(bn.running_var.dtype)


def _input_scale_error(bn: Any, s: torch.Tensor) -> Refusal | None:
    """Why the cast statistics of :func:`bn_statistics_for_input_scale` would not give the exact BN of
    ``x * s`` (overflow, or ``var + eps`` lost to rounding), checked per channel, or ``None``."""
    mean, var = bn_statistics_for_input_scale(bn, s)
    s64, eps = s.detach().double(), bn.eps
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
        bad = int((~torch.isfinite(var) | ~torch.isfinite(mean)).nonzero()[0, 0])
        return Refusal(f"scale entry s[{bad}] = {float(s64[bad]):.3g} overflows `BatchNorm`'s running statistics")
    # the affine the folded BN computes on x, against the exact one (|s| / std, mean / std)
    got_a = 1 / torch.sqrt(var.double() + eps)
    want_a = s64.abs() / torch.sqrt(bn.running_var.double() + eps)
    got_b = got_a * mean.double()
    want_b = torch.sign(s64) * bn.running_mean.double() / torch.sqrt(bn.running_var.double() + eps)
    tol = 64 * torch.finfo(bn.running_var.dtype).eps
    err = torch.maximum((got_a - want_a).abs() / want_a.abs().clamp_min(1e-300),
                        (got_b - want_b).abs() / want_b.abs().clamp_min(1e-300))
    if bool((err > tol).any()) or not bool(torch.isfinite(err).all()):
        bad = int(torch.nan_to_num(err, nan=float("inf")).argmax())
        return Refusal(f"scale entry s[{bad}] = {float(s64[bad]):.3g} cannot be folded into `BatchNorm`'s running "
                       f"statistics in {bn.running_var.dtype} (var/s^2 loses precision); the mul stays")
    return None


def bn_input_refusal(bn: Any, s: torch.Tensor) -> Refusal | None:
    """Why ``bn``'s input channels cannot take ``s`` (asked before anything changes), or ``None``."""
    if bn.training or bn.running_var is None:
        return Refusal(f"`{type(bn).__name__}` uses batch statistics; only an eval BN with running stats takes it")
    if bool((s == 0).any()):
        return Refusal("the scale has zero entries, which a following BatchNorm cannot undo")
    return _input_scale_error(bn, s)


def scale_bn_input(bn: Any, s: torch.Tensor) -> None:
    """Eval BN of ``x * s`` (:func:`bn_input_refusal` checked the cast values are exact)."""
    mean, var = bn_statistics_for_input_scale(bn, s)
    replace_tensor(bn, "running_mean", mean)
    replace_tensor(bn, "running_var", var)
    sign = torch.sign(s)
    if bool((sign > 0).all()):
        return
    if bn.weight is None:
        scale_norm_affine(bn, sign)
    else:
        replace_tensor(bn, "weight", bn.weight * sign)


class BatchNormRule(ModuleLayerRule):
    """``nn.BatchNorm*d``: channels first; the output takes a scale, an eval BN's input too."""

    name = "batch_norm"
    kind = "bn"
    takes_input_scale = True

    def accepts(self, module: Any) -> bool:
        return isinstance(module, _BatchNorm)

    def layout(self, module: Any, node: fx.Node) -> ChannelInfo:
        if isinstance(module, nn.BatchNorm2d):
            return ChannelInfo(module.num_features, -3)
        if isinstance(module, nn.BatchNorm3d):
            return ChannelInfo(module.num_features, -4)
        return ChannelInfo(module.num_features, channels_first(node))

    def scale_output(self, module: Any, v: torch.Tensor) -> None:
        scale_norm_affine(module, v)

    def input_channels(self, module: Any) -> int:
        return int(module.num_features)

    def input_refusal(self, module: Any, s: torch.Tensor) -> Refusal | None:
        return bn_input_refusal(module, s)

    def scale_input(self, module: Any, s: torch.Tensor) -> None:
        scale_bn_input(module, s)


BATCH_NORM = BatchNormRule()
