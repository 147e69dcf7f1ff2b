"""Issue 5: folds never change another user or call; propagation; refusals with reasons; hand-written ASR."""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSE_RTOL, n_params, perturb_asr, rel_err
from torch import nn

import asr_fx

torch.manual_seed(0)


def _fuse(model: nn.Module, *inputs: torch.Tensor, **kwargs):
    """(fused, report, relative error) in eval mode, warnings silenced."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model, **kwargs)
    with torch.no_grad():
        ref, out = model(*inputs), fused(*inputs)
    if isinstance(ref, tuple):
        return fused, asr_fx.fusion_report(fused), max(rel_err(r, o) for r, o in zip(ref, out))
    return fused, asr_fx.fusion_report(fused), rel_err(ref, out)


def _muls(gm) -> int:
    return sum(n.target in (operator.mul, torch.mul, "mul", "mul_", operator.imul) for n in gm.graph.nodes)


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(-2, 2)
                m.bias.uniform_(-1, 1)
    return model


# --- the authors' style: ASR written by hand inside a BatchNorm wrapper -------------------------

class ASRBatchNorm2d(nn.Module):
    """BN whose output is multiplied by sigmoid(attention_net(learnable_vector)), written by hand."""

    def __init__(self, planes: int, asr: bool = True, reduction: int = 4, expand: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(planes)
        self.asr, self.expand = asr, expand
        if asr:
            self.learnable_vector = nn.Parameter(torch.randn(1, planes, 1, 1))
            self.attention_net = nn.Sequential(
                nn.Conv2d(planes, planes // reduction, 1), nn.ReLU(inplace=True),
                nn.Conv2d(planes // reduction, planes, 1))

    def forward(self, x):
        out = self.bn(x)
        if not self.asr:
            return out
        b, c = self.learnable_vector.size(0), self.learnable_vector.size(1)
        attention = torch.sigmoid(self.attention_net(self.learnable_vector)).view(b, c, 1, 1)
        return out * attention.expand_as(out) if self.expand else out * attention


class HandWrittenNet(nn.Module):
    def __init__(self, asr: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = ASRBatchNorm2d(8, asr)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = ASRBatchNorm2d(8, asr)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = ASRBatchNorm2d(8, asr, expand=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _structure(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


def test_hand_written_asr_fuses_to_the_vanilla_graph():
    torch.manual_seed(1)
    vanilla = _randomize_bn(HandWrittenNet(asr=False)).eval()
    model = HandWrittenNet(asr=True).eval()
    model.load_state_dict(vanilla.state_dict(), strict=False)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = asr_fx.fuse(model, strict=True)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL
    assert _structure(fused) == _structure(asr_fx.passes.trace(vanilla))
    assert n_params(fused) == n_params(vanilla)
    report = asr_fx.fusion_report(fused)
    assert [r.where for r in report.records] == ["bn"] * 3 and all(r.from_attention for r in report.records)


# --- shared safety ------------------------------------------------------------------------------

class SharedConv(nn.Module):
    """One Conv2d called at two places; optionally a conv after the second call."""

    def __init__(self, head: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1) if head else None

    def forward(self, x):
        a = self.conv(x)
        b = self.conv(F.relu(a))
        if self.head is not None:
            b = self.head(F.max_pool2d(F.relu(b), 2))
        return a.sum(dim=(2, 3)), b


@pytest.mark.parametrize("head", [True, False], ids=["next-conv", "no-next-layer"])
def test_shared_module_asr_after_one_call_only(head):
    model = asr_fx.instrument(SharedConv(head), sites=["conv_1"]).eval()
    perturb_asr(model)
    fused, report, err = _fuse(model, torch.randn(2, 6, 8, 8))
    assert err <= FUSE_RTOL  # the largest relative error over the outputs
    [record] = report.records
    if head:
        assert record.where == "next-conv" and record.into == "head" and "called at 2 places" in record.reason
        assert _muls(fused) == 0
    else:
        assert not record.folded and "called at 2 places" in record.reason and "model output" in record.reason
    assert torch.equal(fused.conv.weight, model.conv.weight), "the shared conv must not be changed"


class MultiUser(nn.Module):
    """A BN output used by an ASR site (hand-written) and by the skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.2)

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        branch = self.conv2(F.relu(out * self.scale))
        return branch + out


def test_multi_user_value_pushes_the_scale_forward_and_keeps_the_skip():
    model = _randomize_bn(MultiUser())
    fused, report, err = _fuse(model, torch.randn(2, 4, 6, 6))
    assert err <= FUSE_RTOL
    [record] = report.records
    assert record.where == "next-conv" and record.into == "conv2" and "other user" in record.reason
    assert torch.equal(fused.bn1.weight, model.bn1.weight)
    assert _muls(fused) == 0 and n_params(fused) == n_params(model) - 4


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.rand(3, 1, 1) + 0.5)

    def forward(self, x):
        return self.a(x) + self.b(x) * self.scale


def test_tied_weights_are_never_scaled():
    model = Tied()
    fused, report, err = _fuse(model, torch.randn(2, 3, 4, 4))
    assert err <= FUSE_RTOL and not report.records[0].folded
    assert "tied" in report.records[0].reason
    assert fused.a.weight is fused.b.weight and n_params(fused) == n_params(model)


def test_fuse_does_not_change_its_input():
    model = _randomize_bn(MultiUser()).eval()
    before = copy.deepcopy(model.state_dict())
    _fuse(model, torch.randn(1, 4, 4, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- propagation and splitting ------------------------------------------------------------------

class AfterAdd(nn.Module):
    """A scale after a residual add, then ReLU, pooling, flatten and a linear head."""

    def __init__(self, negative: bool = False, act: str = "relu", view: bool = False) -> None:
        super().__init__()
        self.view = view
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "leaky": nn.LeakyReLU(0.1), "relu6": nn.ReLU6()}[act]
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 3)
        sign = -1.0 if negative else 1.0
        self.register_buffer("scale", sign * (torch.rand(1, 4, 1, 1) + 0.3))

    def forward(self, x):
        y = F.relu(self.conv(x)) + x
        y = self.pool(self.act(y * self.scale))
        return self.fc(y.view(y.size(0), -1) if self.view else torch.flatten(y, 1))


@pytest.mark.parametrize("view", [False, True], ids=["flatten", "view"])
def test_scale_after_an_add_goes_through_relu_pool_and_flatten_into_the_linear(view):
    x = torch.randn(2, 4, 4, 4)
    fused, report, err = _fuse(AfterAdd(view=view), x, example_inputs=(x,))
    assert err <= FUSE_RTOL and report.records[0].where == "next-linear" and _muls(fused) == 0


def test_flatten_without_shapes_is_refused_with_the_way_out():
    fused, report, err = _fuse(AfterAdd(), torch.randn(2, 4, 4, 4))
    assert err <= FUSE_RTOL and "example_inputs" in report.records[0].reason


@pytest.mark.parametrize("negative, act, words", [
    (True, "relu", "negative"), (False, "gelu", "gelu"), (True, "leaky", "negative"), (False, "relu6", "bounds"),
])
def test_non_commuting_ops_are_refused_with_a_reason(negative, act, words):
    x = torch.randn(2, 4, 4, 4)
    fused, report, err = _fuse(AfterAdd(negative, act), x, example_inputs=(x,))
    assert err <= FUSE_RTOL
    assert not report.records[0].folded and words in report.records[0].reason.lower()


def test_leaky_relu_with_a_positive_scale_commutes():
    x = torch.randn(2, 4, 4, 4)
    fused, report, err = _fuse(AfterAdd(False, "leaky"), x, example_inputs=(x,))
    assert err <= FUSE_RTOL and report.records[0].folded


class IntoNext(nn.Module):
    """A scale after a concat, pushed into a grouped conv / transposed conv / BN after it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1)
        self.next = {"grouped-conv": nn.Conv2d(6, 4, 3, groups=2),
                     "conv-transpose": nn.ConvTranspose2d(6, 4, 2, groups=2),
                     "bn": _randomize_bn(nn.Sequential(nn.BatchNorm2d(6)))[0]}[kind]
        self.register_buffer("scale", torch.randn(6, 1, 1))

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.next(F.avg_pool2d(y * self.scale, 1)), y.mean()


@pytest.mark.parametrize("kind", ["grouped-conv", "conv-transpose", "bn"])
def test_scale_after_a_concat_with_other_users_goes_into_the_next_layer(kind):
    x = torch.randn(2, 2, 5, 5)
    model = IntoNext(kind).eval()
    fused, report, err = _fuse(model, x)
    assert err <= FUSE_RTOL  # the largest relative error over the outputs
    assert report.records[0].where == ("next-bn" if kind == "bn" else "next-conv")


class SplitAdd(nn.Module):
    """``(bn(conv(x)) + conv2(x)) * s``: the scale splits over the add, and over a channel concat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(3, 2, 1)
        self.register_buffer("s", torch.randn(1, 4, 1, 1))
        self.register_buffer("t", torch.randn(1, 6, 1, 1))

    def forward(self, x):
        y = (self.bn(self.conv(x)) + self.conv2(x)) * self.s
        return torch.cat([y, self.conv3(x)], -3) * self.t


def test_scale_after_an_add_or_concat_splits_into_both_producers():
    model = _randomize_bn(SplitAdd())
    fused, report, err = _fuse(model, torch.randn(2, 3, 5, 5))
    assert err <= FUSE_RTOL and _muls(fused) == 0
    assert [r.where for r in report.records] == ["bn+conv", "bn+conv"]


def test_in_place_mul_read_before_is_refused():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.register_buffer("s", torch.rand(3, 1, 1) + 0.5)

        def forward(self, x):
            y = self.conv(x)
            before = y.sum()
            y.mul_(self.s)
            return y + before

    fused, report, err = _fuse(M(), torch.randn(1, 3, 2, 2))
    assert err <= FUSE_RTOL and not report.records[0].folded


def test_fold_bn_runs_last_and_gives_the_vanilla_deploy_structure():
    model = asr_fx.instrument(HandWrittenNet(asr=False), sites=["bn0.bn", "bn2.bn"]).eval()
    perturb_asr(model)
    _randomize_bn(model)
    fused, report, err = _fuse(model, torch.randn(2, 3, 8, 8), fold_bn=True, strict=True)
    assert err <= FUSE_RTOL and _muls(fused) == 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_fold_bn_leaves_tied_convs_tied():
    class TiedBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
            self.b.weight = self.a.weight
            self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn_a(self.a(x)) + self.bn_b(self.b(x))

    model = _randomize_bn(TiedBN())
    fused, _, err = _fuse(model, torch.randn(2, 3, 4, 4), fold_bn=True)
    assert err <= FUSE_RTOL and fused.a.weight is fused.b.weight and n_params(fused) == n_params(model)


class DenseLike(nn.Module):
    """DenseNet-style: a scaled value is concatenated with the block input and goes into BN -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)
        self.conv2 = nn.Conv2d(7, 5, 1)
        self.register_buffer("scale", torch.randn(1, 4, 1, 1))

    def forward(self, x):
        y = self.conv1(x)
        features = torch.cat([x, y * self.scale], 1)
        return self.conv2(F.relu(self.bn(features))), y.sum()


def test_scale_through_a_concat_goes_into_the_next_bn():
    model, x = _randomize_bn(DenseLike()), torch.randn(2, 3, 5, 5)
    fused, report, err = _fuse(model, x)
    assert err <= FUSE_RTOL and "example_inputs" in report.records[0].reason  # the input's rank and channels
    fused, report, err = _fuse(model, x, example_inputs=(x,))
    assert err <= FUSE_RTOL and _muls(fused) == 0
    assert report.records[0].where == "next-bn" and report.records[0].into == "bn"


class FunctionalChain(nn.Module):
    """A scale after an add goes through functional ops into a functional conv and linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.w, self.b = nn.Parameter(torch.randn(6, 2, 1, 1)), nn.Parameter(torch.randn(6))
        self.lin_w = nn.Parameter(torch.randn(3, 4 * 2 * 2))
        self.register_buffer("scale", torch.rand(1, 4, 1, 1) + 0.2)

    def forward(self, x):
        y = (self.conv(x) + x) * self.scale
        y = F.dropout(F.max_pool2d(F.relu(y), 2), 0.5, training=False).contiguous()
        a = F.conv2d(F.avg_pool2d(y, 1), self.w, self.b, groups=2)
        return a, F.linear(torch.flatten(y, 1), self.lin_w)


def test_functional_ops_and_functional_next_layers():
    x = torch.randn(2, 4, 4, 4)
    fused, report, err = _fuse(FunctionalChain(), x, example_inputs=(x,))
    assert err <= FUSE_RTOL and _muls(fused) == 0
    assert report.records[0].where == "next-conv+next-linear"
