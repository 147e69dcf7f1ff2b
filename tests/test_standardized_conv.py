"""Weight-standardized convs with a gain (NF-Nets' ScaledStdConv2d), written here by hand: the conv that
ends a norm-free residual branch is a site, and its scale folds into the gain (passes/layers/standardized_conv.py).
A standardized conv without a gain is no site: a scale of its weight is undone by the standardization."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asr_fx
from asr_fx.passes.capture.trace import trace
from asr_fx.passes.layers.standardized_conv import standardized_conv


class ScaledStdConv(nn.Conv2d):
    """``conv(x, gain * (W - mean) / std * scale)`` per output filter, as NF-Nets compute it."""

    def __init__(self, cin: int, cout: int, k: int, gain: bool = True) -> None:
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(torch.empty(cout, 1, 1, 1).uniform_(0.5, 1.5)) if gain else None
        self.scale = (cin * k * k) ** -0.5

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1) if self.gain is not None else None,
                              training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NormFreeBlock(nn.Module):
    """``x + 0.2 * conv2(act(conv1(act(x) * beta)))``: no norm layer anywhere."""

    def __init__(self, channels: int, gain: bool = True) -> None:
        super().__init__()
        self.conv1 = ScaledStdConv(channels, channels, 3, gain)
        self.conv2 = ScaledStdConv(channels, channels, 1, gain)

    def forward(self, x):
        out = F.silu(x) * 0.9
        out = self.conv2(F.silu(self.conv1(out)))
        return out * 0.2 + x


class NormFreeNet(nn.Module):
    def __init__(self, gain: bool = True) -> None:
        super().__init__()
        self.stem = ScaledStdConv(3, 8, 3, gain)
        self.blocks = nn.Sequential(NormFreeBlock(8, gain), NormFreeBlock(8, gain))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_the_conv_ending_each_branch_is_a_site_and_folds_into_its_gain():
    torch.manual_seed(0)
    vanilla, x = NormFreeNet().eval(), torch.randn(2, 3, 8, 8)
    model = asr_fx.instrument(vanilla, example_inputs=(x,))
    sites = asr_fx.get_config(model)["sites"]
    assert [s["module"] for s in sites] == ["blocks.0.conv2", "blocks.1.conv2"], sites
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "psi"):
                m.psi.normal_(std=0.5)
        ref = model(x)
        assert not torch.allclose(ref, vanilla(x), atol=1e-4)  # the blocks act
        fused = asr_fx.fuse(model, strict=True, example_inputs=(x,))
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-6)
        gain = fused.get_submodule("blocks.0.conv2").gain
        assert not torch.equal(gain, vanilla.blocks[0].conv2.gain)  # the scale went into the gain
        assert torch.equal(fused.get_submodule("blocks.0.conv2").weight, vanilla.blocks[0].conv2.weight)
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(vanilla)


def test_a_standardized_conv_without_a_gain_is_no_site():
    vanilla = NormFreeNet(gain=False).eval()
    gm = trace(vanilla)
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.conv2d, F.conv2d)]
    assert convs and all(standardized_conv(gm, n) is None for n in convs)
    with pytest.raises(asr_fx.NoSitesError):
        asr_fx.instrument(vanilla, example_inputs=(torch.randn(2, 3, 8, 8),))


def test_a_hand_written_scale_after_a_standardized_conv_without_gain_stays_and_is_reported():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = ScaledStdConv(3, 4, 1, gain=False)
            self.v = nn.Parameter(torch.tensor([0.5, 2.0, -1.0, 3.0]).reshape(1, 4, 1, 1))

        def forward(self, x):
            return self.conv(x) * self.v

    model, x = Scaled().eval(), torch.randn(2, 3, 4, 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model, example_inputs=(x,))
        torch.testing.assert_close(fused(x), model(x))
    assert not asr_fx.fusion_report(fused).records[0].folded
