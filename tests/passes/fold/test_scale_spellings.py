"""Scales spelled as a division, ``addcmul`` or ``einsum`` are folded (or reported), and cats with keyword
tensors or broadcast pieces are handled without a crash."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import asr_fx


class _Spelled(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        s = self.scale.reshape(1, 4, 1, 1)
        if self.spelling == "div":
            return h / s
        if self.spelling == "div_exp":
            return h / self.scale.exp().reshape(1, 4, 1, 1)
        if self.spelling == "div_":
            return h.div_(s)
        if self.spelling == "addcmul":
            return torch.addcmul(x.mean(1, keepdim=True), h, s, value=0.5)
        return torch.einsum("bchw,c->bchw", h, self.scale)


def _fuse(model: nn.Module, x: torch.Tensor, shapes: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return asr_fx.fuse(model.eval(), example_inputs=(x,) if shapes else None)


@pytest.mark.parametrize("shapes", [True, False])
@pytest.mark.parametrize("spelling", ["div", "div_exp", "div_", "addcmul", "einsum"])
def test_scales_spelled_otherwise_fold(spelling: str, shapes: bool) -> None:
    model = _Spelled(spelling)
    x = torch.randn(2, 3, 5, 5)
    fused = _fuse(model, x, shapes)
    report = asr_fx.fusion_report(fused)
    assert report.records and all(r.folded for r in report.records), report.table()
    with torch.no_grad():
        y = torch.randn(2, 3, 5, 5)
        ref, out = model(y.clone()), fused(y.clone())
    assert (ref - out).abs().max() <= 1e-5 * ref.abs().max()


class _CatKeyword(nn.Module):
    def __init__(self, broadcast: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 1 if broadcast else 4, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.broadcast = broadcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.broadcast:
            return torch.cat([self.b(x) + self.a(x), self.c(x)], 1) * self.scale
        return torch.cat(tensors=[self.a(x), self.b(x)], dim=1) * self.scale


@pytest.mark.parametrize("shapes", [True, False])
@pytest.mark.parametrize("broadcast", [False, True], ids=["keyword-cat", "broadcast-add-into-cat"])
def test_cats_fold_or_are_reported(broadcast: bool, shapes: bool) -> None:
    model = _CatKeyword(broadcast)
    x = torch.randn(2, 3, 5, 5)
    fused = _fuse(model, x, shapes)
    report = asr_fx.fusion_report(fused)
    assert report.records
    assert broadcast or not shapes or all(r.folded for r in report.records), report.table()
    with torch.no_grad():
        assert (model(x) - fused(x)).abs().max() <= 1e-5 * model(x).abs().max()
