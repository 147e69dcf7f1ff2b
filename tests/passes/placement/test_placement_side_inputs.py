"""Placement: a residual branch's side inputs (an attention mask) do not hide the branch."""

from __future__ import annotations

import torch
from conftest import FUSE_RTOL, perturb_asr, rel_err
from torch import nn

import asr_fx


class MaskedBlock(nn.Module):
    """Post-norm encoder block: attention whose scores take a mask bias, output projection, MLP."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / 4.0 + bias
        x = self.norm1(x + self.proj(scores.softmax(-1) @ v))
        return self.norm2(x + self.fc2(torch.relu(self.fc1(x))))


class MaskedEncoder(nn.Module):
    """The mask bias is built to the sizes (``.shape``, ``.ndim``, ``.device``) of the embeddings' output, as
    Hugging Face encoders build their extended attention mask: every block reads it."""

    def __init__(self, depth: int = 3, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.blocks = nn.ModuleList(MaskedBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        assert h.ndim == 3
        keep = mask[:, None, :].to(device=h.device, dtype=torch.bool).expand(h.shape[0], h.shape[1], h.shape[1])
        bias = torch.zeros(keep.shape, dtype=h.dtype, device=h.device).masked_fill(~keep, -1e4)
        for block in self.blocks:
            h = block(h, bias)
        return self.head(h[:, 0])


def _inputs(batch: int = 2, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 50, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return ids, mask


def test_every_block_reading_a_mask_built_from_an_earlier_output_takes_its_sites():
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    sites = asr_fx.find_sites(model, example_inputs=_inputs(), existing=False)
    assert [s.module for s in sites] == [f"blocks.{i}.{name}" for i in range(3) for name in ("proj", "fc2")]
    assert {s.rule for s in sites} == {"transformer"}


def test_a_masked_encoder_fuses_with_the_mask_equivalent():
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    instrumented = asr_fx.instrument(model, example_inputs=_inputs())
    perturb_asr(instrumented)
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=_inputs())
    ids, mask = _inputs(3, 5)
    with torch.no_grad():
        ref = instrumented(ids, mask)
        assert rel_err(ref, fused(ids, mask)) <= FUSE_RTOL
        assert rel_err(ref, instrumented(ids, torch.ones_like(mask))) > 1e-3  # the mask matters
