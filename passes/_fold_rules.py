"""Per-layer folding formulas (the paper's Appendix A): ``layer(x) * v == layer'(x)``.

Each function takes the layer and the per-channel scale ``v`` (1-D, one entry per output channel)
and rescales the layer's parameters in place, replacing ``nn.Parameter`` objects (never writing
into a tensor that something else may share). Each returns ``None`` on success or the reason it
cannot fold.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.detach().clone())


def _scale_bias(module: nn.Module, v: torch.Tensor) -> None:
    if getattr(module, "bias", None) is not None:
        _replace(module, "bias", module.bias * v)


def fold_into_conv(conv: _ConvNd, v: torch.Tensor) -> str | None:
    """Eq. 6: ``K'[o] = K[o] * v[o]``, ``b'[o] = b[o] * v[o]``.

    Conv weights are ``(out, in/groups, *k)``; transposed conv weights are
    ``(in, out/groups, *k)``, with output channel ``o = g * (out/groups) + j``.
    """
    w = conv.weight
    k = (1,) * (w.dim() - 2)
    if isinstance(conv, _ConvTransposeNd):
        g = conv.groups
        in_per_group, out_per_group = w.shape[0] // g, w.shape[1]
        scaled = w.reshape(g, in_per_group, out_per_group, *w.shape[2:]) * v.reshape(g, 1, out_per_group, *k)
        _replace(conv, "weight", scaled.reshape(w.shape))
    else:
        _replace(conv, "weight", w * v.reshape(-1, 1, *k))
    _scale_bias(conv, v)
    return None


def fold_into_linear(linear: nn.Linear, v: torch.Tensor) -> str | None:
    """Eq. 12: rows of ``W`` and entries of ``b`` scaled."""
    _replace(linear, "weight", linear.weight * v.reshape(-1, 1))
    _scale_bias(linear, v)
    return None


def fold_into_norm(norm: nn.Module, v: torch.Tensor) -> str | None:
    """Eq. 7/11: ``gamma' = gamma * v``, ``beta' = beta * v`` (BN, GN, IN, LN; train mode too).

    A norm without an affine gets ``gamma = v``, ``beta = 0`` as buffers, so the parameter count
    and the exported op set do not change (BatchNormalization always carries scale and bias).
    """
    weight = getattr(norm, "weight", None)
    if weight is None:
        if not isinstance(norm, _BatchNorm):
            return f"{type(norm).__name__} has no affine parameters to take the scale"
        del norm.weight, norm.bias
        norm.register_buffer("weight", v.detach().clone())
        norm.register_buffer("bias", torch.zeros_like(v))
        norm.affine = True
        return None
    if isinstance(norm, nn.LayerNorm):
        shape = norm.normalized_shape
        scale = v.reshape((1,) * (len(shape) - 1) + (-1,))
    else:
        scale = v
    _replace(norm, "weight", weight * scale)
    if norm.bias is not None:
        _replace(norm, "bias", norm.bias * scale)
    return None


def fold_rule(module: nn.Module):
    """The folding function for a module, or ``None`` where there is none."""
    if isinstance(module, (_ConvNd, _ConvTransposeNd)):
        return fold_into_conv
    if isinstance(module, nn.Linear):
        return fold_into_linear
    if isinstance(module, (_BatchNorm, nn.GroupNorm, _InstanceNorm, nn.LayerNorm)):
        return fold_into_norm
    return None


def fold_kind(module: nn.Module) -> str:
    """Where a scale went, as the fusion report says it: ``conv``, ``linear``, ``bn`` or ``norm``."""
    if isinstance(module, (_ConvNd, _ConvTransposeNd)):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return "bn" if isinstance(module, _BatchNorm) else "norm"
