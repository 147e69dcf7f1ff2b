"""Folds into layers whose output is not what their weights suggest are refused with a reason (or done
right): hooks, parametrizations, replaced forwards, buffers the forward writes, InstanceNorm corner cases,
dtypes of non-affine norms, Python-number scales in float64 models, ``.to(dtype)`` on a scale."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import asr_fx


def _fuse(model: nn.Module, *inputs: torch.Tensor, shapes: bool = True):
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model, example_inputs=inputs if shapes else None)
    return fused, asr_fx.fusion_report(fused)


def _same(model: nn.Module, fused: nn.Module, *inputs: torch.Tensor, rtol: float = 1e-5) -> None:
    with torch.no_grad():
        ref, out = model(*(t.clone() for t in inputs)), fused(*(t.clone() for t in inputs))
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert (out - ref).abs().max() <= rtol * ref.abs().max(), (out - ref).abs().max()


class _ScaledConv(nn.Module):
    def __init__(self, conv: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv or nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale


def _unfolded_reason(report) -> str:
    left = [r for r in report.records if not r.folded]
    assert left, report.table()
    return left[-1].reason


@pytest.mark.parametrize("shapes", [True, False])
def test_a_layer_with_a_forward_hook_takes_no_scale(shapes: bool) -> None:
    model = _ScaledConv()
    model.conv.register_forward_hook(lambda m, a, out: out + 1.0)
    x = torch.randn(2, 3, 6, 6)
    fused, report = _fuse(model, x, shapes=shapes)
    assert "hook" in _unfolded_reason(report)
    _same(model, fused, torch.randn(2, 3, 6, 6))


def test_a_parametrized_weight_takes_no_scale() -> None:
    model = _ScaledConv(parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)))
    x = torch.randn(2, 3, 6, 6)
    fused, report = _fuse(model, x)
    assert "parametrization" in _unfolded_reason(report)
    _same(model, fused, torch.randn(2, 3, 6, 6))


def test_old_style_weight_norm_is_refused_or_kept_not_crashed() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _ScaledConv(torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3, padding=1)))
    x = torch.randn(2, 3, 6, 6)
    try:
        fused, report = _fuse(model, x)
    except asr_fx.ASRError as exc:
        assert "weight_norm" in str(exc)
        return
    assert "hook" in _unfolded_reason(report)
    _same(model, fused, torch.randn(2, 3, 6, 6))


def test_a_forward_replaced_on_the_instance_takes_no_scale() -> None:
    model = _ScaledConv()
    conv = model.conv
    conv.forward = lambda x: nn.Conv2d.forward(conv, x).tanh()  # type: ignore[method-assign]
    x = torch.randn(2, 3, 6, 6)
    fused, report = _fuse(model, x)
    assert "forward was replaced" in _unfolded_reason(report)
    _same(model, fused, torch.randn(2, 3, 6, 6))


class _WrittenGate(nn.Module):
    """A gate kept in a buffer the forward writes: ``x * s`` reads this call's gate, not a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("s", torch.ones(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.s.copy_(torch.sigmoid(x.mean((0, 2, 3), keepdim=True)).repeat(1, 2, 1, 1)[:, :4])
        return self.conv(x) * self.s


@pytest.mark.parametrize("shapes", [True, False])
def test_a_buffer_the_forward_writes_is_no_constant(shapes: bool) -> None:
    model = _WrittenGate()
    fused, _report = _fuse(model, torch.randn(2, 3, 4, 4), shapes=shapes)
    for _ in range(2):  # another input: another gate
        _same(model, fused, torch.randn(2, 3, 4, 4))


def test_instance_norm_whose_num_features_differs_from_its_input_is_refused() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.norm = nn.InstanceNorm2d(7)  # torch ignores num_features without an affine
            self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)) * self.scale

    model = Model()
    x = torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, _report = _fuse(model, x)
        _same(model, fused, x)


def test_instance_norm_1d_on_an_unbatched_input() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.InstanceNorm1d(4, affine=True)
            self.scale = nn.Parameter(torch.rand(4, 1) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x) * self.scale

    model = Model()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 9)
    fused, _ = _fuse(model, x)
    _same(model, fused, torch.randn(4, 9))


@pytest.mark.parametrize("number", [True, False], ids=["number", "parameter"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_non_affine_norm_in_a_float64_or_float16_model(dtype: torch.dtype, number: bool) -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 6)
            self.norm = nn.LayerNorm(6, elementwise_affine=False)
            self.scale = nn.Parameter(torch.rand(6) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.lin(x)) * (0.75 if number else self.scale)

    model = Model().to(dtype)
    x = torch.randn(3, 4, dtype=dtype)
    for shapes in (True, False):
        fused, _ = _fuse(model, x, shapes=shapes)
        _same(model, fused, torch.randn(3, 4, dtype=dtype), rtol=1e-2 if dtype == torch.float16 else 1e-10)


@pytest.mark.parametrize("number", [1e40, 1e-50])
def test_python_number_scales_in_a_float64_model(number: float) -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * number

    model = Model().double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for shapes in (True, False):
        fused, _ = _fuse(model, x, shapes=shapes)
        _same(model, fused, x, rtol=1e-12)


def test_to_dtype_on_a_scale_is_kept() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.scale.to(x.device, torch.float64)

    model = Model()
    x = torch.randn(2, 3, 4, 4)
    for shapes in (True, False):
        fused, _ = _fuse(model, x, shapes=shapes)
        _same(model, fused, x)


def test_a_scale_that_adds_a_dimension_is_not_folded_without_shapes() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.scale = nn.Parameter(torch.rand(1, 1, 4, 1, 1) + 0.5)  # (B, C, H, W) * this: 5-d result

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.scale

    model = Model()
    x = torch.randn(2, 3, 4, 4)
    for shapes in (True, False):
        fused, report = _fuse(model, x, shapes=shapes)
        assert not report.records[0].folded
        _same(model, fused, x)


def test_no_scale_moves_back_across_a_dtype_promoting_multiply() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 6).half()
            self.register_buffer("up", torch.rand(1, 6) + 0.5)  # float32: h16 * up is float32

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.up * 1.1  # 1.1 rounds in float16, not in float32

    model = Model()
    x = torch.randn(3, 4).half()
    for shapes in (True, False):
        fused, report = _fuse(model, x, shapes=shapes)
        assert "another dtype" in " ".join(r.reason for r in report.records), report.table()
        _same(model, fused, x, rtol=1e-6)
