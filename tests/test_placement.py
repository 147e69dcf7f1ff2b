"""Placement: existing channel attention found by pattern, the placement rules, find_sites, inspect."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from asr_fx.passes import trace
from asr_fx.passes.attention_patterns import find_channel_attention


class ECA(nn.Module):
    """Hand-written ECA: GAP -> 1-D conv across channels -> sigmoid -> x * gate (expand_as)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * y.sigmoid().expand_as(x)


class ECANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.eca = ECA()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.eca(torch.relu(self.bn(self.conv(x))))
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))  # no parameters: not an attention network
        gated = y * torch.sigmoid(self.fc.weight.sum())  # a gate that is not fed by pooling
        return self.fc(gated.mean((2, 3)))


@pytest.mark.parametrize(
    ("name", "count", "first_module", "first_channels", "activation"),
    [
        ("mobilenet_v3_small", 9, "features.1.block.1", 16, "hardsigmoid"),
        ("efficientnet_b0", 16, "features.1.0.block.1", 32, "sigmoid"),
        ("regnet_y_400mf", 16, "trunk_output.block1.block1-0.f.se", 48, "sigmoid"),
    ],
)
def test_finds_torchvision_squeeze_excitation(name, count, first_module, first_channels, activation):
    model = getattr(torchvision.models, name)()
    gm = trace(model)
    found = find_channel_attention(gm)
    se_modules = [n for n, m in model.named_modules() if type(m).__name__ == "SqueezeExcitation"]
    assert len(found) == count == len(se_modules)
    assert [a.module for a in found] == se_modules
    first = found[0]
    assert (first.module, first.channels, first.channel_pos, first.activation) == (
        first_module, first_channels, -3, activation)
    nodes = {n.name: n for n in gm.graph.nodes}
    for att in found:
        mul = nodes[att.mul]
        assert {a.name for a in mul.args} == {att.gate, att.feature}
        assert nodes[att.pool].args[0].name == att.feature
        assert gm.get_submodule(att.module).fc2.out_channels == att.channels


def test_finds_hand_written_eca_only():
    gm = trace(ECANet())
    found = find_channel_attention(gm)
    assert len(found) == 1
    att = found[0]
    assert (att.module, att.pool, att.feature, att.channels, att.channel_pos) == ("eca", "eca_pool", "relu", 16, -3)
    assert "eca_conv" in att.network
    assert gm.graph.find_nodes(op="call_method", target="sigmoid")[0].name == att.gate


def test_no_attention_in_plain_resnet():
    assert find_channel_attention(trace(torchvision.models.resnet18())) == []
