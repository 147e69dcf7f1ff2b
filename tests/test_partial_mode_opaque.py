"""Partial capture looks inside modules that the whole trace keeps as one call for their train-only code."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSE_RTOL, perturb_asr, rel_err
from torch import nn

import asr_fx


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class _NoisyEncoder(nn.Module):
    """Adds noise to its input while training only (as wav2vec2's masking of time steps): no one graph for both
    modes, so the whole trace keeps it as one call."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        for block in self.blocks:
            x = block(x)
        return x


class _Model(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.encoder = _NoisyEncoder(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def test_sites_inside_a_module_kept_whole_for_its_train_only_code_are_captured_as_parts():
    torch.manual_seed(0)
    model = _Model().eval()
    x = torch.randn(2, 5, 8)
    instrumented = asr_fx.instrument(model, example_inputs=(x,))
    config = asr_fx.get_config(instrumented)
    assert config["parts"] == ["encoder"]
    assert [s["node"] for s in config["sites"]] == [f"encoder/blocks.{i}/fc2" for i in range(2)]
    assert type(instrumented) is _Model
    instrumented.train()
    assert not torch.equal(instrumented(x), instrumented(x))  # the encoder's train-only noise is kept
    instrumented.eval()
    perturb_asr(instrumented)
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=(x,))
    other = torch.randn(3, 4, 8)
    with torch.no_grad():
        assert rel_err(instrumented(other), fused(other)) <= FUSE_RTOL
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(model)


def test_without_example_inputs_no_sites_names_the_module_kept_whole():
    with pytest.raises(asr_fx.NoSitesError, match=r"branches on self.training: \['encoder'\]"):
        asr_fx.instrument(_Model())
