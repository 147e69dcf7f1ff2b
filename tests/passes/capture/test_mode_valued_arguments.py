"""Capture: a number a forward picks by mode (``dropout=0.0 if not self.training else p``) follows the mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import asr_fx
from asr_fx.passes import trace


class Attention(nn.Module):
    """Hugging Face style: the attention core gets its dropout rate by mode; the output projection is inside."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.p = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        p = 0.0 if not self.training else self.p
        weights = F.dropout((q @ k.transpose(-1, -2)).softmax(-1), p=p, training=self.training)
        return self.out(weights @ v)


class Encoder(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.attn = Attention(dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x + self.attn(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_a_mode_picked_number_is_bound_to_the_mode_and_the_module_is_traced_through():
    torch.manual_seed(0)
    model = Encoder()
    gm = trace(model)
    assert gm.meta["asr_fx.mode_leaves"] == []  # not kept as one call
    x = torch.randn(2, 5, 8)
    for mode in (True, False):
        model.train(mode)
        gm.train(mode)
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        assert torch.equal(gm(x), want)
    sites = asr_fx.find_sites(model.eval(), rule="transformer", existing=False)
    assert [s.module for s in sites] == ["attn.out", "fc2"]  # the projection inside the attention is a site
