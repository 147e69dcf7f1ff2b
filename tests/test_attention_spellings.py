"""Existing channel attention written as model code does: a hard-sigmoid gate of the model's own (a module
with ``relu6(x + 3) * h_max / 6``, the in-place ``x.add_(3).clamp_(0, 6).div_(6)``), and an SE whose expand step
reads its sizes from the gate (``out.view(out.size(0), out.size(1), 1, 1)``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asr_fx
from asr_fx.passes import trace
from asr_fx.passes.placement.attention_patterns import find_channel_attention


class _HSigmoid(nn.Module):
    def __init__(self, h_max: float = 1) -> None:
        super().__init__()
        self.relu = nn.ReLU6(inplace=True)
        self.h_max = h_max

    def forward(self, x):
        return self.relu(x + 3) * self.h_max / 6


def _hard_sigmoid_inplace(x):
    return x.add_(3.0).clamp_(0.0, 6.0).div_(6.0)


def _hard_sigmoid_clamp(x):
    return (x + 3).clamp(min=0, max=6) / 6


class _GateSE(nn.Module):
    def __init__(self, channels: int, gate) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(4, channels, 1)
        self.gate = gate

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class _SizesFromGateSE(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channels, 4), nn.ReLU(inplace=True), nn.Linear(4, channels))
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        b, c, _, _ = x.size()
        out = self.sigmoid(self.fc(self.avg_pool(x).view(b, c)))
        out = out.view(out.size(0), out.size(1), 1, 1)
        return x * out.expand_as(x)


class _Block(nn.Module):
    def __init__(self, se: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.se = se

    def forward(self, x):
        return F.relu(x + self.se(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))


class _Net(nn.Module):
    def __init__(self, se: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Block(se)

    def forward(self, x):
        return self.block(self.stem(x))


_GATES = {
    "hsigmoid-module": (lambda: _GateSE(8, _HSigmoid()), "hardsigmoid"),
    "hsigmoid-inplace": (lambda: _GateSE(8, _hard_sigmoid_inplace), "hardsigmoid"),
    "hsigmoid-clamp": (lambda: _GateSE(8, _hard_sigmoid_clamp), "hardsigmoid"),
    "sizes-from-gate": (lambda: _SizesFromGateSE(8), "sigmoid"),
}


@pytest.mark.parametrize("name", sorted(_GATES))
@pytest.mark.parametrize("shape_aware", [False, True])
def test_the_attention_is_found(name, shape_aware):
    make, activation = _GATES[name]
    x = torch.randn(2, 3, 8, 8)
    gm = trace(_Net(make()), example_inputs=(x,) if shape_aware else None)
    found = find_channel_attention(gm)
    assert [(a.module, a.activation, a.channels) for a in found] == [("block.se", activation, 8)]


@pytest.mark.parametrize("name", sorted(_GATES))
def test_the_site_is_before_the_attention_and_conversion_keeps_the_function(name):
    torch.manual_seed(0)
    make, _ = _GATES[name]
    model = _Net(make()).eval()
    x = torch.randn(2, 3, 8, 8)
    sites = asr_fx.find_sites(model, example_inputs=(x,))
    # the residual rule walks back through the gate; the model's own attention is listed as existing
    assert [s.module for s in sites] == ["block.bn2", "block.se"]
    converted = asr_fx.instrument(model, sites=["block.bn2"], convert_existing=True, example_inputs=(x,))
    assert "block_se" in converted.asr.keys()
    converted.eval()
    with torch.no_grad():
        assert torch.isfinite(converted(x)).all()
