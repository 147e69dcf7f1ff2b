"""Capture: a random draw is a graph node, never one draw frozen into the graph at trace time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import asr_fx
from asr_fx.passes import trace


class _LayerDrop(nn.Module):
    """Skips each layer at random while training: ``torch.rand(())`` takes no traced argument."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if not (self.training and torch.rand(()) < 0.1):
                x = x + layer(x)
        return x


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + 0.1 * torch.randn(4)  # constant size: drawn on every call, not once at trace time


class _WithLayerDrop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _LayerDrop()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@pytest.mark.parametrize("example", [False, True])
def test_a_branch_on_a_random_draw_is_refused_not_frozen(example):
    model = _LayerDrop()
    inputs = (torch.randn(2, 4),) if example else None
    with pytest.raises(asr_fx.TraceError, match=r"torch.rand\(\(\)\) < 0.1"):
        trace(model, example_inputs=inputs)


def test_a_module_branching_on_a_random_draw_stays_one_call():
    gm = trace(_WithLayerDrop())
    assert gm.meta["asr_fx.mode_leaves"] == ["encoder"]


@pytest.mark.parametrize("example", [False, True])
def test_noise_of_a_constant_size_is_drawn_on_every_call(example):
    model = _Noisy().eval()
    x = torch.randn(2, 4)
    gm = trace(model, example_inputs=(x,) if example else None).eval()
    torch.manual_seed(3)
    want = model(x)
    torch.manual_seed(3)
    assert torch.equal(gm(x), want)
    assert not torch.equal(gm(x), gm(x))
