"""Attention calls that torch's ONNX exporter refuses in the form a model writes them export after
instrument and fuse (passes/export/export_forms.py): rank-5 attention (timm Twins), and a float mask with the
``transpose(1, 2).reshape`` after it (timm BEiT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import asr_fx
from asr_fx.passes.capture.trace import trace
from asr_fx.passes.export.export_forms import attention_4d, for_export


class GroupedAttention(nn.Module):
    """Attention over windows as a rank-5 batch (B, windows, heads, tokens, dim), as Twins writes it."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # (B, windows, tokens, dim)
        B, W, N, C = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, W, N, 3, self.heads, C // self.heads).permute(3, 0, 1, 4, 2, 5)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return x + self.proj(out.transpose(2, 3).reshape(B, W, N, C))


class MaskedAttention(nn.Module):
    """Attention with a learned float mask (a relative position bias), then ``transpose(1, 2).reshape``."""

    def __init__(self, dim: int = 8, heads: int = 2, tokens: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x):  # (B, tokens, dim)
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.unsqueeze(0))
        return x + self.proj(out.transpose(1, 2).reshape(B, N, C))


def _fused(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    inst = asr_fx.instrument(model.eval(), example_inputs=(x,)).eval()
    assert asr_fx.get_config(inst)["sites"]
    with torch.no_grad():
        for m in inst.modules():
            if hasattr(m, "psi"):
                m.psi.normal_(std=0.5)
    return inst, asr_fx.fuse(inst, strict=True, example_inputs=(x,))


def test_attention_4d_computes_what_attention_computes():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 2, 4, 8, generator=gen) for _ in range(3))
    # rank 5 runs as one rank-4 batch: the kernel may block it differently, so equal up to float rounding
    torch.testing.assert_close(attention_4d(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    q3, k3, v3, mask3 = q[0, 0], k[0, 0], v[0, 0], torch.randn(2, 4, 4, generator=gen)  # rank 3: SAM's ViT
    torch.testing.assert_close(attention_4d(q3, k3, v3, attn_mask=mask3),
                               F.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask3), rtol=1e-5, atol=1e-6)
    mask = torch.randn(3, 2, 4, 4, generator=gen)
    torch.testing.assert_close(attention_4d(q[0], k[0], v[0], attn_mask=mask),
                               F.scaled_dot_product_attention(q[0], k[0], v[0], attn_mask=mask), rtol=0, atol=0)


def test_for_export_leaves_the_model_it_is_given_unchanged():
    torch.manual_seed(0)
    gm = trace(MaskedAttention().eval())
    code = gm.code
    copy = for_export(gm)
    assert copy is not gm and gm.code == code and "attention_4d" in copy.code
    assert copy.get_submodule("qkv") is gm.get_submodule("qkv")
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), gm(x), rtol=0, atol=0)


def test_rank_5_attention_exports_to_onnx_after_fuse(tmp_path):
    x = torch.randn(2, 3, 4, 8)
    inst, fused = _fused(GroupedAttention(), x)
    report = asr_fx.export_onnx(fused, tmp_path / "grouped.onnx", x, reference=inst)
    assert max(o.max_rel for o in report.outputs) <= 1e-4


def test_masked_attention_with_transpose_reshape_exports_to_onnx_after_fuse(tmp_path):
    x = torch.randn(2, 5, 8)
    inst, fused = _fused(MaskedAttention(), x)
    report = asr_fx.export_onnx(fused, tmp_path / "masked.onnx", x, reference=inst)
    assert max(o.max_rel for o in report.outputs) <= 1e-4


def test_a_model_holding_a_captured_part_exports_with_the_part_rewritten(tmp_path):
    """A partially captured model is the library's own module with GraphModule parts (timm NesT)."""
    torch.manual_seed(0)
    part = trace(GroupedAttention().eval())
    outer = nn.Sequential(nn.Identity(), part).eval()
    exported = for_export(outer)
    assert exported is not outer and outer[1] is part and "attention_4d" in exported[1].code
    x = torch.randn(2, 3, 4, 8)
    report = asr_fx.export_onnx(outer, tmp_path / "outer.onnx", x)
    assert max(o.max_rel for o in report.outputs) <= 1e-4
    plain = nn.Sequential(nn.Linear(2, 2))
    assert for_export(plain) is plain  # nothing to rewrite: the model itself
