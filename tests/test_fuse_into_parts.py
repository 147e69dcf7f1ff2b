"""``fuse(..., into=)`` of a model captured part by part re-traces each vanilla part on the input shapes the
part was captured with (a part whose forward branches on a shape traces only shape-aware)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import asr_fx


class Part(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.gamma = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)  # a layer scale: folded, so traced again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.bn(self.conv(x)))) * self.gamma
        if h.shape[-1] > 2:  # a condition on a shape: traces with example inputs only
            h = h[..., 1:]
        return h


class Whole(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.part = Part()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.part(x)
        if h.sum() > 0:  # a condition on values: the whole forward does not trace
            h = h * 2
        return self.head(h)


def test_into_retraces_parts_on_their_recorded_input_shapes() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = asr_fx.instrument(Whole(), example_inputs=(x,))
        assert asr_fx.get_config(model)["parts"] == ["part"]
        vanilla = Whole()
        filled = asr_fx.fuse(model.eval(), into=vanilla, example_inputs=(x,))
    assert filled is vanilla
    with torch.no_grad():
        assert (filled(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()


class OwnScales(nn.Module):
    """A model's own scales computed from its parameters: a PoolFormer-style layer scale reshaped by
    unsqueeze (folds into the conv before it) and a Swin V2-style ``logit_scale.exp()`` on a matmul
    (stays a multiply)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 8, 1)
        self.layer_scale = nn.Parameter(torch.rand(8) + 0.5)
        self.logit_scale = nn.Parameter(torch.log(torch.tensor(3.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = h + self.layer_scale.unsqueeze(-1).unsqueeze(-1) * self.mix(h)
        t = h.flatten(2)
        attn = t @ t.transpose(1, 2) * torch.clamp(self.logit_scale, max=4.6).exp()
        return attn


def test_into_keeps_a_models_own_scales_apart_from_asr_sites() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = asr_fx.instrument(OwnScales(), example_inputs=(x,))
        vanilla = OwnScales()
        filled = asr_fx.fuse(model.eval(), into=vanilla, example_inputs=(x,))
    with torch.no_grad():
        assert (filled(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()
