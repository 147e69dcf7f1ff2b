"""Dead-code removal in ``fuse`` keeps every write whose effect is read: in-place chains, writes through
identity modules (Dropout/Identity return their input itself), helper calls that write into their
argument and return nothing used, and writes into model inputs and buffers."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import rel_err
from torch import nn

import asr_fx


@torch.fx.wrap
def _add_into_tail(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x[:, :, 1:] += y[:, :, 1:]  # writes into its argument, as torchvision's MViT shortcut helper
    return x


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("m", torch.randn(1, 4, 1, 1))
        self.register_buffer("s", torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h.sub_(self.m).div_(self.s)  # the chain's result is unused: div_ still changes h
        g = self.conv(x)
        g.mul_(self.s).add_(1)
        return h + g


class _IdentityAlias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.drop = nn.Dropout(0.1)
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        o = h
        h = self.drop(h)  # in eval: h itself
        h.mul_(self.scale)  # scales o too
        return o


class _Shortcut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        _add_into_tail(h, self.b(x))  # return value unused
        return h.relu()


@pytest.mark.parametrize("model", [_Chain, _IdentityAlias, _Shortcut])
def test_fuse_keeps_writes_whose_effect_is_read(model: type[nn.Module]) -> None:
    m = model().eval()
    x = torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(m, check=False)  # the structure itself must be right, not only caught
    with torch.no_grad():
        assert rel_err(m(x.clone()), fused(x.clone())) <= 1e-5


def test_writes_into_an_input_and_a_buffer_stay() -> None:
    class Writes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.register_buffer("last", torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            self.last.copy_(y.mean((0, 2, 3)))  # a state update nobody reads in this call
            x.mul_(2)  # the caller sees it
            return y

    m = Writes().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(m, check=False)
    x = torch.randn(1, 3, 4, 4)
    x_copy = x.clone()
    with torch.no_grad():
        fused(x)
    assert torch.equal(x, 2 * x_copy)
    assert fused.get_buffer("last").abs().sum() > 0


def test_dead_attention_networks_still_go() -> None:
    model = asr_fx.instrument(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True)),
                              example_inputs=(torch.randn(1, 3, 8, 8),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model)
    assert sum(p.numel() for p in fused.parameters()) == 8 * 27 + 8 + 16


@pytest.mark.slow
def test_torchvision_mvit_v2_fuses() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.video.mvit_v2_s().eval()
    x = torch.randn(1, 3, 16, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model, example_inputs=(x,))  # checked: raises if the shortcut write were lost
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= 1e-4
