"""What a failed capture says: a shape condition is not called a condition on tensor values, a documented input
size is used instead of failing, a way out names every blocker and was tried, and messages stay readable."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import asr_fx
from asr_fx.errors import TraceError
from asr_fx.passes import trace


class _SizeChecked(nn.Module):
    """Checks its input size in Python, as timm's patch embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if x.shape[-1] % 4 != 0 or x.dim() != 4:
            raise ValueError("the input size must be a multiple of 4")
        return torch.relu(self.bn(self.conv(x)))


class _ValueChecked(_SizeChecked):
    def forward(self, x):
        if x.mean() > 0:
            return x
        return torch.relu(self.bn(self.conv(x)))


def test_a_shape_condition_is_not_called_a_condition_on_tensor_values():
    with pytest.raises(TraceError) as info:
        trace(_SizeChecked())
    message = str(info.value)
    assert "tensor values" not in message
    assert "input shapes or dtypes only" in message and "Way out: pass example_inputs=(...)" in message
    with pytest.raises(TraceError, match="depends on tensor values"):
        trace(_ValueChecked())


def test_a_documented_input_size_is_used_without_example_inputs():
    timm_like = _SizeChecked()
    timm_like.pretrained_cfg = {"input_size": (3, 12, 12)}
    instrumented = asr_fx.instrument(timm_like)
    assert list(instrumented.asr) == ["bn"] and asr_fx.get_config(instrumented)["input_shape"] == [2, 3, 12, 12]
    hf_like = _SizeChecked()
    hf_like.config = types.SimpleNamespace(image_size=8, num_channels=3)
    assert asr_fx.get_config(asr_fx.instrument(hf_like))["input_shape"] == [2, 3, 8, 8]
    with pytest.raises(TraceError, match="pass example_inputs"):
        asr_fx.instrument(_SizeChecked())  # documents nothing: the error says what to pass


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: never traces
            return x
        return -x


class _ManyBlockers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gate1 = _Branchy()
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gate2 = _Branchy()
        self.gate3 = _Branchy()

    def forward(self, x):
        return self.gate3(self.gate2(self.b(self.gate1(self.a(x)))))


def test_the_way_out_names_every_blocker_and_was_tried():
    with pytest.raises(TraceError) as info:
        asr_fx.instrument(_ManyBlockers())
    message = str(info.value)
    assert "Tried: with leaf_modules=['gate1', 'gate2', 'gate3'] the whole model traces." in message
    assert all(len(line) < 1000 for line in message.splitlines())
    instrumented = asr_fx.instrument(_ManyBlockers(), leaf_modules=["gate1", "gate2", "gate3"])
    assert set(instrumented.asr) == {"a_1", "b_1"}


class _NothingCapturable(nn.Module):
    """Every part refuses: messages of the parts are listed one per line, shortened at a word boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleList(_Branchy() for _ in range(7))

    def forward(self, x):
        for part in self.parts:
            x = part(x)
        return x.sum() if x.sum() > 0 else x.mean()


def test_partial_capture_errors_are_readable_lines():
    with pytest.raises(TraceError) as info:
        asr_fx.instrument(_NothingCapturable(), example_inputs=(torch.randn(2, 3, 4, 4),))
    lines = str(info.value).splitlines()
    assert all(len(line) < 1000 for line in lines)
    parts = [line for line in lines if line.startswith("  - ")]
    assert len(parts) == 5 and lines[-1] == "  ... and 2 more"
    full = "symbolically traced variables cannot be used as inputs to control flow"
    for line in parts:  # cut at a word boundary, marked
        assert len(line) <= 320 and line.endswith("…") and line[-2].isalnum()
        assert full in line
