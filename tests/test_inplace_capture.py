"""In-place capture (issue 16, issue 14 item 2): ``+=``, ``*=``, ``-=``, ``/=`` are traced as in-place
ops, the traced and fused graphs compute what eager computes where the written value is read again,
and a residual ``out += identity`` stays in place through instrument and fuse."""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torchvision
from conftest import fuse_checked
from test_fold_regressions import ImulReadAgain  # y = conv(x); z = y; z *= p; return z + y
from torch import nn

import asr_fx
from asr_fx.passes.capture.trace import trace

INPLACE = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _inplace_nodes(model: nn.Module) -> list[torch.fx.Node]:
    """The in-place ops of ``model``'s graph (traced when it is the user's own class)."""
    gm = model if isinstance(model, torch.fx.GraphModule) else trace(model)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in INPLACE]


class Augmented(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.p = nn.Parameter(torch.full((1, 4, 1, 1), 2.0))

    def forward(self, x, r):
        out = self.conv(x)
        out += r
        y = self.conv(x)
        y *= self.p
        y -= r
        y /= self.p
        return out, y


def test_augmented_assignments_are_traced_as_inplace_ops():
    model = Augmented().eval()
    gm = trace(model)
    targets = [n.target for n in _inplace_nodes(gm)]
    assert targets == [operator.iadd, operator.imul, operator.isub, operator.itruediv]
    assert "+= r" in gm.code and "*= " in gm.code
    x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        for got, want in zip(gm(x, r), model(x, r)):
            torch.testing.assert_close(got, want)


def test_imul_of_a_value_read_again_eager_traced_and_fused_agree():
    torch.manual_seed(0)
    model, x = ImulReadAgain().eval(), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(eager, 4 * model.conv(x))  # p = 2: 2 p conv(x)
        torch.testing.assert_close(trace(model)(x), eager)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = asr_fx.fuse(model, example_inputs=(x,))
        torch.testing.assert_close(fused(x), eager)
    # `y *= p` writes into conv's output, which both operands of the add read after it: folding
    # p into the conv gives both of them the scaled value, as the write did
    record = asr_fx.fusion_report(fused).records[0]
    assert record.folded and record.into == "conv"
    assert not _inplace_nodes(fused)


class ResidualBlock(nn.Module):
    """A ResNet basic block written as torchvision writes it: ``out += identity``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ResidualBlock(), ResidualBlock())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)


def test_residual_inplace_add_stays_in_place_after_instrument_and_fuse():
    torch.manual_seed(0)
    vanilla, x = ResidualNet(), torch.randn(2, 3, 8, 8)
    _randomize_bn(vanilla)
    assert len(_inplace_nodes(trace(vanilla))) == 2
    model = asr_fx.instrument(vanilla, example_inputs=(x,)).eval()
    fused = fuse_checked(model, x)
    assert len(_inplace_nodes(fused)) == 2
    assert not [n for n in trace(fused).graph.nodes if n.target is operator.add]
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in vanilla.parameters())


def test_torchvision_resnet_with_inplace_add_instruments_trains_and_fuses_in_place():
    torch.manual_seed(0)
    model = asr_fx.instrument(torchvision.models.resnet18(num_classes=10)).train()
    assert len(_inplace_nodes(model)) == 8  # one `out += identity` per BasicBlock
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    psi = [copy.deepcopy(p) for p in asr_fx.asr_parameters(model)]
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(psi, asr_fx.asr_parameters(model)))
    model.eval()
    fused = asr_fx.fuse(model, strict=True, example_inputs=(x,))
    assert len(_inplace_nodes(fused)) == 8
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


class WriteIntoScaledInputLater(nn.Module):
    """``m = y * v`` is a fresh value; ``y.relu_()`` afterwards changes ``y`` only. Pushing ``v`` into
    ``conv2`` and giving ``m``'s use to ``y`` would make ``conv2`` read the ReLU'd ``y``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.v = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 3.0]).reshape(1, 4, 1, 1))

    def forward(self, x):
        y = self.conv(x)
        m = y * self.v
        y.relu_()
        return self.conv2(m) + y


@pytest.mark.parametrize("write", ["relu_", "setitem"])
def test_a_later_inplace_write_into_the_scaled_input_is_refused_and_reported(write):
    torch.manual_seed(0)
    model = (WriteIntoScaledInputLater() if write == "relu_" else WriteIntoScaledInputBySlice()).eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model, example_inputs=(x,))
        torch.testing.assert_close(fused(x), model(x))
    record = asr_fx.fusion_report(fused).records[0]
    assert not record.folded and "in-place" in record.reason, record.reason


class SliceAssign(nn.Module):
    """``a[:, :, 1:, 1:] = a[:, :, 1:, 1:] + rel`` (MViTv2's relative positions): torch.fx's Proxy has no
    ``__setitem__``; the write is read again by ``softmax(a)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.rel = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        a = self.bn(self.conv(x)).relu()  # a norm-act site at bn
        a[:, :, 1:, 1:] = a[:, :, 1:, 1:] + self.rel
        return a.softmax(-1) + x.mean(1, keepdim=True)


class WriteIntoScaledInputBySlice(WriteIntoScaledInputLater):
    """As its parent, the later write being ``y[:, :2] = 0``."""

    def forward(self, x):
        y = self.conv(x)
        m = y * self.v
        y[:, :2] = 0.0
        return self.conv2(m) + y


def test_item_assignment_is_traced_as_an_inplace_setitem_and_fuses():
    torch.manual_seed(0)
    vanilla, x = SliceAssign(), torch.randn(2, 3, 6, 6)
    _randomize_bn(vanilla)
    vanilla.eval()
    gm = trace(vanilla)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(operator.setitem) == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), vanilla(x))
    model = asr_fx.instrument(vanilla, example_inputs=(x,)).eval()
    assert asr_fx.get_config(model)["sites"]
    fused = fuse_checked(model, x)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in vanilla.parameters())
