"""einops layers and functions (``Rearrange``, ``rearrange``, ``repeat``) stay opaque calls: an einops-style ViT
is captured whole and takes its transformer sites."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSE_RTOL, rel_err, train_step
from torch import nn

import asr_fx
from asr_fx.passes import trace

einops = pytest.importorskip("einops")
from einops import rearrange, reduce, repeat  # noqa: E402
from einops.layers.torch import Rearrange, Reduce  # noqa: E402


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.qkv(self.norm(x)).chunk(3, -1))
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return self.out(rearrange(attn @ v, "b h n d -> b n (h d)"))


class _EinopsViT(nn.Module):
    def __init__(self, image: int = 16, patch: int = 4, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.patches = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
                                     nn.Linear(3 * patch * patch, dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(nn.ModuleList([_Attention(dim), nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))]) for _ in range(depth))
        self.pool = Reduce("b n d -> b d", "mean")
        self.head = nn.Linear(dim, 3)

    def forward(self, img):
        x = self.patches(img)
        x = torch.cat((repeat(self.cls, "1 1 d -> b 1 d", b=x.shape[0]), x), dim=1) + self.pos
        for attn, mlp in self.blocks:
            x = attn(x) + x
            x = mlp(x) + x
        return self.head(self.pool(x) + reduce(x, "b n d -> b d", "max"))


def test_einops_calls_are_single_nodes():
    x = torch.randn(2, 3, 16, 16)
    gm = trace(_EinopsViT(), example_inputs=(x,))
    functions = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {rearrange, repeat, reduce} <= functions
    modules = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert {Rearrange, Reduce} <= modules


def test_an_einops_vit_takes_transformer_sites_trains_and_fuses():
    torch.manual_seed(0)
    model = _EinopsViT().eval()
    x = torch.randn(2, 3, 16, 16)
    instrumented = asr_fx.instrument(model, example_inputs=(x,))
    assert sorted(instrumented.asr.keys()) == ["blocks_0_0_out", "blocks_0_1_3", "blocks_1_0_out", "blocks_1_1_3"]
    train_step(instrumented, x)
    instrumented.eval()
    other = torch.randn(5, 3, 16, 16)
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(instrumented(other), fused(other)) <= FUSE_RTOL
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(model)
