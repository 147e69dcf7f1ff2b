"""Issue 5: one test per fold target; each fused model matches in eval mode and has no Mul left."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSE_RTOL, n_params, rel_err
from torch import nn

import asr_fx

torch.manual_seed(0)


def _muls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target in (operator.mul, operator.imul, torch.mul, "mul", "mul_")]


def _fuse_and_check(model: nn.Module, *inputs: torch.Tensor, shapes: bool = False, **kwargs) -> asr_fx.FusionReport:
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = asr_fx.fuse(model, example_inputs=inputs if shapes else None, **kwargs)
    with torch.no_grad():
        out = fused(*inputs)
    report = asr_fx.fusion_report(fused)
    assert all(r.folded for r in report.records), report.table()
    assert report.records, "the model had no constant mul to fold"
    assert not _muls(fused), fused.graph
    assert out.shape == ref.shape and rel_err(ref, out) <= FUSE_RTOL
    assert n_params(fused) <= n_params(model)
    return report


class Scaled(nn.Module):
    """``layer(x) * scale`` with a learnable per-channel scale (a layer scale), spelled in one of many ways."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...], spelling: str = "op",
                 tuple_output: bool = False) -> None:
        super().__init__()
        self.layer, self.tuple_output = layer, tuple_output
        self.scale = nn.Parameter(torch.randn(shape))
        self.spelling = spelling

    def forward(self, x):
        y = self.layer(x)
        if self.tuple_output:
            y = y[0]
        s = self.scale
        if self.spelling == "op":
            return y * s
        if self.spelling == "op-reversed":
            return s * y
        if self.spelling == "torch.mul":
            return torch.mul(y, s)
        if self.spelling == "torch.mul-reversed":
            return torch.mul(s, y)
        if self.spelling == "method":
            return y.mul(s)
        if self.spelling == "expand_as":
            return y * s.expand_as(y)
        if self.spelling == "type_as":
            return s.type_as(y) * y
        if self.spelling == "to-dtype":
            return y * s.to(y.dtype)
        if self.spelling == "mul_":
            y.mul_(s)
            return y
        y *= s
        return y


SPELLINGS = ["op", "op-reversed", "torch.mul", "torch.mul-reversed", "method", "mul_", "imul", "expand_as", "type_as",
             "to-dtype"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_mul_spelling_folds_into_a_conv(spelling):
    report = _fuse_and_check(Scaled(nn.Conv2d(3, 4, 3), (4, 1, 1), spelling), torch.randn(2, 3, 6, 6))
    assert [r.where for r in report.records] == ["conv"]


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (4, 1, 1), (1, 1, 1, 1), ()])
def test_conv_broadcast_shapes(shape):
    _fuse_and_check(Scaled(nn.Conv2d(3, 4, 3), shape), torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("dims, groups", [(1, 1), (1, 2), (2, 1), (2, 4), (3, 2)])
def test_conv_nd_any_groups(dims, groups):
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](4, 8, 3, groups=groups)
    x = torch.randn(2, 4, *([5] * dims))
    _fuse_and_check(Scaled(conv, (8,) + (1,) * dims), x)


@pytest.mark.parametrize("dims, groups", [(1, 2), (2, 1), (2, 2), (2, 4), (3, 2)])
def test_conv_transpose_nd_any_groups(dims, groups):
    """Grouped transposed convs keep weights as (in, out/groups, *k): the fold must scale within groups."""
    conv = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dims - 1](4, 8, 3, groups=groups, stride=2)
    x = torch.randn(2, 4, *([3] * dims))
    report = _fuse_and_check(Scaled(conv, (8,) + (1,) * dims), x)
    assert report.records[0].where == "conv"


def _bn(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        if layer.weight is not None:
            layer.weight.uniform_(-2, 2)
            layer.bias.uniform_(-1, 1)
    return layer


@pytest.mark.parametrize("layer, shape, x", [
    (nn.BatchNorm1d(4), (4, 1), torch.randn(2, 4, 5)),
    (nn.BatchNorm1d(4), (4,), torch.randn(3, 4)),
    (nn.BatchNorm2d(4), (1, 4, 1, 1), torch.randn(2, 4, 3, 3)),
    (nn.BatchNorm3d(4), (4, 1, 1, 1), torch.randn(2, 4, 2, 3, 3)),
    (nn.SyncBatchNorm(4), (1, 4, 1, 1), torch.randn(2, 4, 3, 3)),
    (nn.BatchNorm2d(4, affine=False), (4, 1, 1), torch.randn(2, 4, 3, 3)),
], ids=["bn1d-3d", "bn1d-2d", "bn2d", "bn3d", "syncbn", "bn-no-affine"])
def test_batchnorm_family(layer, shape, x):
    report = _fuse_and_check(Scaled(_bn(layer), shape), x, shapes=True)
    assert report.records[0].where == "bn"


@pytest.mark.parametrize("layer, shape, x", [
    (nn.GroupNorm(2, 4), (4, 1, 1), torch.randn(2, 4, 3, 3)),
    (nn.GroupNorm(2, 4, affine=False), (4, 1, 1), torch.randn(2, 4, 3, 3)),
    (nn.InstanceNorm2d(4, affine=True), (1, 4, 1, 1), torch.randn(2, 4, 3, 3)),
    (nn.InstanceNorm2d(4), (1, 4, 1, 1), torch.randn(2, 4, 3, 3)),
    (nn.InstanceNorm1d(4, affine=True), (4, 1), torch.randn(2, 4, 5)),
    (nn.LayerNorm(4), (1, 1, 4), torch.randn(2, 5, 4)),
    (nn.LayerNorm(4, bias=False), (4,), torch.randn(2, 5, 4)),
    (nn.LayerNorm(4, elementwise_affine=False), (4,), torch.randn(2, 5, 4)),
    (nn.LayerNorm((5, 4)), (4,), torch.randn(2, 5, 4)),
], ids=["gn", "gn-no-affine", "in2d", "in2d-no-affine", "in1d", "ln", "ln-no-bias", "ln-no-affine", "ln-2d"])
def test_norms(layer, shape, x):
    report = _fuse_and_check(Scaled(layer, shape), x, shapes=True)
    assert report.records[0].where == "norm"


def test_norms_without_affine_keep_the_vanilla_onnx_op_set(tmp_path):
    """The weight a fold adds to an affine-less norm is a buffer, and the ONNX ops stay the same."""

    class Norms(nn.Module):
        def __init__(self, scaled: bool) -> None:
            super().__init__()
            self.inorm, self.gn = nn.InstanceNorm2d(4), nn.GroupNorm(2, 4, affine=False)
            self.ln = nn.LayerNorm(3, elementwise_affine=False)
            self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5) if scaled else None
            self.scale_ln = nn.Parameter(torch.rand(3) + 0.5) if scaled else None

        def forward(self, x):
            a, b, c = self.inorm(x), self.gn(x), self.ln(x)
            if self.scale is not None:
                a, b, c = a * self.scale, b * self.scale, c * self.scale_ln
            return a + b + c

    x = torch.randn(2, 4, 3, 3)
    vanilla, model = Norms(False).eval(), Norms(True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model, example_inputs=(x,))
        ops = [asr_fx.export_onnx(m, tmp_path / f"{i}.onnx", x).op_counts for i, m in enumerate((vanilla, fused))]
    assert all(r.folded for r in asr_fx.fusion_report(fused).records)
    assert ops[0] == ops[1]
    assert n_params(fused) == n_params(vanilla) == 0
    assert rel_err(model(x), fused(x)) <= FUSE_RTOL


@pytest.mark.parametrize("shape", [(6,), (1, 1, 6)])
def test_linear_on_tokens(shape):
    report = _fuse_and_check(Scaled(nn.Linear(4, 6), shape), torch.randn(2, 5, 4))
    assert report.records[0].where == "linear"


class Conv1dTokens(nn.Module):
    """A token model (B, L, C) with a Conv1d over the sequence, as in ConvNeXt-1D / audio encoders."""

    def __init__(self, permute: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1, groups=2)
        self.scale = nn.Parameter(torch.randn(6))
        self.permute = permute

    def forward(self, x):
        if self.permute:
            return self.conv(x.permute(0, 2, 1)).permute(0, 2, 1) * self.scale
        return self.conv(x.transpose(1, 2)).transpose(1, 2) * self.scale


@pytest.mark.parametrize("permute", [True, False], ids=["permute", "transpose"])
def test_conv1d_token_model(permute):
    report = _fuse_and_check(Conv1dTokens(permute), torch.randn(2, 7, 4), shapes=not permute)
    assert report.records[0].where == "conv"


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x):
        return self.mha(x, x, x)  # (output, attention weights): the scale multiplies output [0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_output_projection(batch_first):
    report = _fuse_and_check(Scaled(SelfAttention(batch_first), (8,), tuple_output=True), torch.randn(3, 5, 8))
    assert report.records[0].where == "linear" and report.records[0].into == "layer.mha.out_proj"


class Functional(nn.Module):
    """Functional layers on parameters, each followed by a constant per-channel scale."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3), nn.Parameter(torch.randn(6))
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.g, self.beta = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.wt = nn.Parameter(torch.randn(6, 2, 2, 2) * 0.3)
        self.gn_w = nn.Parameter(torch.randn(6))
        self.ln_w = nn.Parameter(torch.randn(5))
        self.lin_w, self.lin_b = nn.Parameter(torch.randn(3, 5) * 0.3), nn.Parameter(torch.randn(3))
        for i, n in enumerate([6, 6, 6, 6, 5, 3]):
            self.register_buffer(f"s{i}", torch.randn(n, 1, 1) if i < 4 else torch.randn(n))

    def forward(self, x):
        y = F.conv2d(x, self.w1, self.b1, padding=1, groups=2) * self.s0
        y = F.batch_norm(y, self.mean, self.var, self.g, self.beta, False, 0.1, 1e-5) * self.s1
        y = F.conv_transpose2d(y, self.wt, None, stride=2, groups=3) * self.s2
        y = F.group_norm(y, 3, self.gn_w, None) * self.s3
        y = F.layer_norm(y[..., :5], (5,), self.ln_w, None) * self.s4
        return F.linear(y, self.lin_w, self.lin_b) * self.s5


def test_functional_forms_on_parameters():
    report = _fuse_and_check(Functional(), torch.randn(2, 6, 3, 3), shapes=True)
    assert [r.where for r in report.records] == ["conv", "bn", "conv", "norm", "norm", "linear"]


def test_functional_norm_without_weight_gets_a_buffer():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("s", torch.randn(4))

        def forward(self, x):
            return F.layer_norm(x, (4,)) * self.s

    _fuse_and_check(M(), torch.randn(2, 3, 4))


class ConvNeXtLike(nn.Module):
    """A ConvNeXt block: dwconv -> permute -> LN -> MLP -> permute -> layer scale -> residual add."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)
        self.layer_scale = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


def test_layer_scale_through_a_permute_folds_and_drops_its_parameter():
    model = ConvNeXtLike()
    report = _fuse_and_check(model, torch.randn(2, 8, 4, 4))
    assert report.records[0].where == "linear" and report.records[0].into == "fc2"
    fused = asr_fx.fuse(model)
    assert n_params(fused) == n_params(model) - 8
    assert "layer_scale" not in dict(fused.named_parameters())
