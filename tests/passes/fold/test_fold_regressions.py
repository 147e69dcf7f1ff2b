"""Fold regression cases, from the minimal programs that once failed (the fuzzer's findings among them).

Each test states what must hold: ``fuse`` returns a model equal to the original in eval mode (outputs,
output dtypes, and what the model writes into its input), leaves the caller's tensors alone, and
every constant multiply left in the fused graph is in the fusion report, or ``fuse`` refuses with an
``asr_fx.ASRError``. Each was an open bug (diagnosis in notes/fuzz-findings.md) and is fixed.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import fx, nn

import asr_fx
from testkit.fuzz_check import constant_muls
from testkit.fuzz_model import multiply

RTOL = 1e-5


def _fuse(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return asr_fx.fuse(model, **kwargs)


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs, then the input as the model left it (in-place ops may write into it)."""
    x = x.clone()
    with torch.no_grad():
        out = model(x)
    return [*(out if isinstance(out, tuple) else (out,)), x]


def assert_equivalent(model: nn.Module, x: torch.Tensor, **fuse_kwargs) -> nn.Module:
    """fuse(model) against model.eval() in float64: values within RTOL, same dtypes, every constant
    mul left in the fused graph reported, the caller's ``x`` unchanged. Returns the fused model."""
    model.eval()
    x_before = x.clone()
    fused = _fuse(model, **fuse_kwargs)
    assert torch.equal(x, x_before), "fuse wrote into the example input it was given"
    ref32 = _outputs(model, x)
    ref64 = _outputs(_double(model), x.double())
    out = _outputs(fused, x)
    assert len(out) == len(ref32)
    for i, (o, r32, r64) in enumerate(zip(out, ref32, ref64)):
        assert o.dtype == r32.dtype, f"output {i}: {o.dtype}, the original gives {r32.dtype}"
        own = (r32.double() - r64).abs().max().item()
        err = (o.double() - r64).abs().max().item()
        assert err <= RTOL * r64.abs().max().item() + 4 * own, f"output {i}: max error {err:.3g}"
    report = asr_fx.fusion_report(fused)
    left = {r.mul for r in report.records if not r.folded}
    # fuse of a model in the module form returns the user's own class with the folds written in: its own
    # forward keeps its multiplies (a folded parameter scale is left at 1), so every reported one may remain
    graph = fused if isinstance(fused, fx.GraphModule) else fx.symbolic_trace(fused)
    if graph is not fused:
        left = {r.mul for r in report.records}
    unreported = [n.format_node() for n in constant_muls(graph) if n.name not in left]
    assert not unreported, f"constant muls left in the graph and not reported: {unreported}"
    return fused


def _double(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def _scale(c: int, *values: float) -> nn.Parameter:
    v = torch.tensor(values or [0.5 + 0.25 * i for i in range(c)])
    return nn.Parameter(v.reshape(1, c, 1, 1))


# ---- item 1: an in-place op redirected into the caller's tensor -------------------------------------


class InplaceAfterScale(nn.Module):
    """``y = x * a; y = y.mul_(b); return conv(y), x + 1``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.a, self.b = _scale(4), _scale(4, 2.0, 1.5, 1.0, 0.5)

    def forward(self, x):
        y = x * self.a
        y = y.mul_(self.b)
        return self.conv(y), x + 1


def test_inplace_op_after_a_folded_mul_does_not_write_into_its_input():
    torch.manual_seed(0)
    assert_equivalent(InplaceAfterScale(), torch.randn(2, 4, 5, 5))


class InplaceScaleOfInput(nn.Module):
    """fuzz finding F1: ``x.mul_(c)`` on the model input, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)
        self.c = _scale(4)

    def forward(self, x):
        return self.conv(x.mul_(self.c))


def test_inplace_scale_of_the_model_input_keeps_writing_it():
    torch.manual_seed(0)
    assert_equivalent(InplaceScaleOfInput(), torch.randn(2, 4, 5, 5))


def test_fuse_does_not_write_into_example_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    before = x.clone()
    _fuse(InplaceScaleOfInput().eval(), example_inputs=(x,))
    assert torch.equal(x, before)


# ---- item 2: `*=` on a tensor that is read again -------------------------------------------------


class ImulReadAgain(nn.Module):
    """``y = conv(x); z = y; z *= p; return z + y`` (eager: 4 conv(x) for p = 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.p = _scale(4, 2.0, 2.0, 2.0, 2.0)

    def forward(self, x):
        y = self.conv(x)
        z = y
        z *= self.p
        return z + y


def test_imul_of_a_value_read_again_is_traced_in_place_or_refused():
    torch.manual_seed(0)
    model = ImulReadAgain()
    try:
        assert_equivalent(model, torch.randn(2, 3, 4, 4))
    except asr_fx.ASRError as exc:
        assert "*=" in str(exc) or "in-place" in str(exc), str(exc)


# ---- item 3: a tiny scale pushed into the next eval-mode BatchNorm --------------------------------


class TinyScaleIntoBN(nn.Module):
    """``GELU -> x * s -> BN`` with an entry of s at 1e-20 (F2: or at 1e4)."""

    def __init__(self, tiny: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.GELU()
        self.s = _scale(4, 1.0, tiny, 0.7, 1.3)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.tensor([0.1, -0.4, 0.3, 0.2]))
            self.bn.running_var.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]))

    def forward(self, x):
        return self.bn(self.act(self.conv(x)) * self.s)


@pytest.mark.parametrize("tiny", [1e-20, 1e-30, -1e-20, 1e4, 1e6])
def test_extreme_scale_into_next_bn_is_refused_or_exact(tiny):
    torch.manual_seed(0)
    assert_equivalent(TinyScaleIntoBN(tiny), torch.randn(2, 3, 4, 4))


def test_small_but_safe_scale_into_next_bn_still_folds():
    """The refusal the fix adds must not refuse ordinary small or large scales."""
    for safe in (1e-3, 1e2):
        torch.manual_seed(0)
        fused = assert_equivalent(TinyScaleIntoBN(safe), torch.randn(2, 3, 4, 4))
        assert asr_fx.fusion_report(fused).summary() == {"next-bn": 1}


# ---- item 4: float64 scales in a float32 model ------------------------------------------------------


class Float64ScaleAfter(nn.Module):
    """``layer(x) * s`` with ``s`` float64 in a float32 model."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("s", (torch.rand(shape, dtype=torch.float64) + 0.5))

    def forward(self, x):
        return self.layer(x) * self.s


@pytest.mark.parametrize("layer", ["groupnorm_no_affine", "conv", "batchnorm"])
def test_float64_per_channel_scale_keeps_dtypes(layer):
    torch.manual_seed(0)
    module = {"groupnorm_no_affine": nn.GroupNorm(2, 4, affine=False), "conv": nn.Conv2d(3, 4, 1),
              "batchnorm": nn.BatchNorm2d(4)}[layer]
    x = torch.randn(2, 4 if layer != "conv" else 3, 4, 4)
    assert_equivalent(Float64ScaleAfter(module, (1, 4, 1, 1)), x, example_inputs=(x,))


def test_float64_scalar_after_groupnorm_without_affine():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 4)
    assert_equivalent(Float64ScaleAfter(nn.GroupNorm(2, 4, affine=False), ()), x, example_inputs=(x,))


def test_float64_scalar_after_conv_folds_and_keeps_float32():
    """Control: a 0-dim float64 scale keeps the float32 output; folding it is correct today."""
    torch.manual_seed(0)
    fused = assert_equivalent(Float64ScaleAfter(nn.Conv2d(3, 4, 1), ()), torch.randn(2, 3, 4, 4))
    assert asr_fx.fusion_report(fused).summary() == {"conv": 1}


# ---- item 5: reshape round trips with example_inputs ------------------------------------------------


class ChannelsLastRoundTrip(nn.Module):
    """``conv(x).flatten(2).transpose(1, 2)``, back with ``unflatten``, then ``* v``."""

    def __init__(self, transpose: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.v = _scale(4)
        self.transpose = transpose

    def forward(self, x):
        t = self.conv(x).flatten(2)
        if self.transpose:
            t = t.transpose(1, 2).transpose(1, 2)
        return t.unflatten(2, (4, 4)) * self.v


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("transpose", [True, False], ids=["channels_last", "flatten_unflatten"])
def test_reshape_round_trip_then_scale_with_example_inputs(batch, transpose):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 4, 4)
    assert_equivalent(ChannelsLastRoundTrip(transpose), x, example_inputs=(x,))


# ---- item 6: every multiply spelling is folded or reported ------------------------------------------


class SpelledScale(nn.Module):
    """``conv(x)`` times a per-channel constant (or a Python literal), spelled ``spelling``."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.v = _scale(4)
        self.spelling = spelling

    def forward(self, x):
        return multiply(self.conv(x), 0.5 if self.spelling == "literal" else self.v, self.spelling)


@pytest.mark.parametrize("spelling", [
    "*", "r*", "operator.mul", "torch.mul", "Tensor.mul", "mul_",
    "torch.multiply", "torch.mul(other=)",
    "Tensor.multiply", "literal",
])
def test_every_multiply_spelling_is_folded_or_reported(spelling):
    torch.manual_seed(0)
    fused = assert_equivalent(SpelledScale(spelling), torch.randn(2, 3, 4, 4))
    report = asr_fx.fusion_report(fused)
    assert len(report.records) == 1, f"{spelling}: the multiply has no record in the fusion report"


# ---- F3 (fuzz): instrument casts ASR blocks to the dtype of the model's first parameter ----------


class Float64ParameterFirst(nn.Module):
    """A float32 model whose first registered parameter is a float64 scalar gain (``x * gain`` stays
    float32: a 0-dim tensor does not promote)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv(x * self.gain))))


@pytest.mark.parametrize("bn_affine_form", [False, True])
def test_instrument_keeps_blocks_in_the_dtype_of_their_site(bn_affine_form):
    torch.manual_seed(0)
    model, x = Float64ParameterFirst().eval(), torch.randn(2, 3, 4, 4)
    asr_model = asr_fx.instrument(model, example_inputs=(x,), bn_affine_form=bn_affine_form).eval()
    with torch.no_grad():
        assert asr_model(x).dtype == model(x).dtype == torch.float32
    assert_equivalent(asr_model, x)
