"""What one ASR block of each registered attention costs at one site of ``C`` channels: the measurement behind
tools/attention_table.py (and its test).

:func:`measure` builds a small model with one ASR site (conv -> BN -> ReLU -> pool -> linear, the site after the BN),
instruments it, moves psi and the attention weights away from their start, fuses, and reports the psi shape, the
parameters added in training and after fusion, and the fuse error.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

import asr_fx
from asr_fx import attention, count_parameters


def one_site_net(channels: int) -> nn.Module:
    """conv -> BN -> ReLU -> global pool -> linear, in eval mode: one ASR site, after the BN."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10),
    ).eval()


def measure(name: str, channels: int) -> dict[str, object]:
    """One row of the attention table for attention ``name`` at ``channels`` channels."""
    torch.manual_seed(0)
    vanilla = one_site_net(channels)
    model = asr_fx.instrument(vanilla, attention=name, sites=["1"])
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.startswith("asr."):
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    fused = asr_fx.fuse(model, strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    return {
        "attention": name,
        "network": type(attention.create(name, channels)).__name__,
        "psi shape": str(tuple(cast(tuple, attention.create(name, channels).psi_shape))),
        "added in training": count_parameters(model) - count_parameters(vanilla),
        "added after fusion": count_parameters(fused) - count_parameters(vanilla),
        "fuse error": f"{((out - ref).abs().max() / ref.abs().max()).item():.1e}",
    }
