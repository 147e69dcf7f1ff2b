"""export_onnx leaves the caller's example input as it was, and verifies outputs that hold infinities."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import asr_fx
from asr_fx.verify import compare


class _WritesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.conv(x)


class _Infinite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("offset", torch.tensor([0.0, float("inf"), -float("inf"), 0.0]).reshape(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.offset


def test_export_does_not_write_into_the_callers_input(tmp_path) -> None:
    x = torch.randn(1, 3, 4, 4)
    before = x.clone()
    report = asr_fx.export_onnx(_WritesInput().eval(), tmp_path / "m.onnx", (x,))
    assert torch.equal(x, before)
    assert report.ok


def test_outputs_with_the_same_infinities_verify(tmp_path) -> None:
    report = asr_fx.export_onnx(_Infinite().eval(), tmp_path / "m.onnx", (torch.randn(1, 3, 4, 4),))
    assert report.ok


def test_infinities_at_other_positions_or_wrong_finite_values_fail() -> None:
    ref = torch.tensor([1.0, float("inf"), -float("inf")])
    assert compare([ref], [np.array([1.0, np.inf, -np.inf], np.float32)], 1e-4, 0.0)[0].ok
    assert not compare([ref], [np.array([1.0, np.inf, np.inf], np.float32)], 1e-4, 0.0)[0].ok
    assert not compare([ref], [np.array([1.0, 5.0, -np.inf], np.float32)], 1e-4, 0.0)[0].ok
    assert not compare([ref], [np.array([1.1, np.inf, -np.inf], np.float32)], 1e-4, 0.0)[0].ok
