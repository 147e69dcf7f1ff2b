"""Sums of parallel conv/norm branches (RepVGG, MobileOne, ACNet while training) are one layer: one site
after the sum, folded into the last layer of every branch (passes/layers/parallel_branches.py)."""

from __future__ import annotations

import torch
from conftest import fuse_checked
from torch import nn

import asr_fx
from asr_fx.passes.capture.trace import trace
from asr_fx.passes.layers.parallel_branches import parallel_sums
from asr_fx.passes.placement.locate import residual_blocks


def _conv_bn(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepBlock(nn.Module):
    """RepVGG's training form: relu(bn(conv3x3(x)) + bn(conv1x1(x)) [+ bn(x)])."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.k3, self.k1 = _conv_bn(cin, cout, 3), _conv_bn(cin, cout, 1)
        self.identity = nn.BatchNorm2d(cout) if cin == cout else None

    def forward(self, x):
        out = self.k3(x) + self.k1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return torch.relu(out)


class OneBlock(nn.Module):
    """MobileOne's training form: ``out = scale(x) + identity(x)``, then ``out += branch(x)`` per branch."""

    def __init__(self, channels: int, branches: int = 3) -> None:
        super().__init__()
        self.scale = _conv_bn(channels, channels, 1, groups=channels)
        self.identity = nn.BatchNorm2d(channels)
        self.kxk = nn.ModuleList(_conv_bn(channels, channels, 3, groups=channels) for _ in range(branches))

    def forward(self, x):
        out = self.scale(x) + self.identity(x)
        for branch in self.kxk:
            out += branch(x)
        return nn.functional.relu(out)


class RepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(RepBlock(3, 8), RepBlock(8, 8), OneBlock(8), RepBlock(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


def _randomize(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)


def test_each_sum_of_parallel_branches_is_one_block_not_a_chain_of_residual_adds():
    gm = trace(RepNet().eval())
    sums = parallel_sums(gm)
    assert [len(s.terms) for s in sums] == [2, 3, 5, 3]
    blocks = residual_blocks(gm)
    assert [b.add for b in blocks] == [s.node for s in sums]  # no add inside a sum is read as residual


def test_sites_after_each_sum_fold_into_every_branch_and_fuse_to_the_vanilla_parameters():
    torch.manual_seed(0)
    vanilla, x = RepNet(), torch.randn(2, 3, 8, 8)
    _randomize(vanilla)
    vanilla.eval()
    model = asr_fx.instrument(vanilla, example_inputs=(x,))
    sites = asr_fx.get_config(model)["sites"]
    assert len(sites) == 4 and all(s["module"] == "" for s in sites), sites
    fused = fuse_checked(model, x)
    with torch.no_grad():
        assert not torch.allclose(model(x), vanilla(x), atol=1e-3)  # the blocks act
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(vanilla)


class ResNetDownsample(nn.Module):
    """bn3(conv(relu(bn(conv(x))))) + bn(conv(x)): the branches start at different nodes, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _conv_bn(3, 8, 3), _conv_bn(8, 8, 3)
        self.down = _conv_bn(3, 8, 1)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))) + self.down(x))


def test_a_residual_block_with_a_downsample_shortcut_is_no_parallel_sum():
    gm = trace(ResNetDownsample().eval())
    assert parallel_sums(gm) == []
    sites = asr_fx.find_sites(ResNetDownsample().eval())
    assert [s.module for s in sites] == ["b.1"], sites
