"""Capture: a layer a forward makes on the fly (``nn.ReLU()(x)``, as DistilBERT's head does)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import asr_fx
from asr_fx.passes import trace


class MadeInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.ReLU()(self.bn(self.conv(x)))  # a stateless layer made in forward: traced through
        return self.fc(nn.Dropout(0.5)(y.mean((2, 3))))


class WeightsMadeInForward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear(3, 3)(x)  # new weights on every call: nothing to capture


def test_a_stateless_layer_made_in_forward_is_traced_through_in_both_modes():
    torch.manual_seed(0)
    model = MadeInForward()
    gm = trace(model)
    x = torch.randn(2, 3, 8, 8)
    for mode in (True, False):
        model.train(mode)
        gm.train(mode)
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        assert torch.equal(gm(x), want)
    sites = asr_fx.find_sites(model, rule="norm-act", existing=False)
    assert [s.module for s in sites] == ["bn"]


def test_a_layer_with_weights_made_in_forward_is_refused_by_name():
    with pytest.raises(asr_fx.TraceError, match="not installed as a submodule"):
        trace(WeightsMadeInForward())
