"""Activations spelled out in arithmetic or as autograd Functions count for norm-act placement, and blocks that call
``drop_connect(x, p, training=self.training)`` are captured, not kept opaque (an EfficientNet-PyTorch-style net)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asr_fx


class _Swish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


_ACTIVATIONS = {
    "x*sigmoid(x)": lambda x: x * torch.sigmoid(x),
    "sigmoid(x)*x": lambda x: x.sigmoid() * x,
    "x*relu6(x+3)/6": lambda x: x * F.relu6(x + 3) / 6,
    "x*(relu6(x+3)/6)": lambda x: x * (F.relu6(x + 3.0) / 6.0),
    "x*hardtanh(x+3,0,6)/6": lambda x: x * F.hardtanh(x + 3, 0.0, 6.0) / 6,
    "swish-Function": _Swish.apply,
}


class _Plain(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.act = act
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_a_spelled_activation_after_a_norm_is_a_norm_act_site(name):
    torch.manual_seed(0)
    model = _Plain(_ACTIVATIONS[name]).eval()
    x = torch.randn(2, 3, 8, 8)
    sites = asr_fx.find_sites(model, example_inputs=(x,))
    assert [(s.module, s.rule) for s in sites] == [("bn1", "norm-act"), ("bn2", "norm-act")]
    instrumented = asr_fx.instrument(model, example_inputs=(x,))
    instrumented.eval()
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=(x,))
    with torch.no_grad():
        ref = instrumented(x)
        assert ((fused(x) - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_a_product_that_is_no_activation_is_not_one():
    model = _Plain(lambda x: x * torch.sigmoid(x + 1)).eval()  # gates another value than it scales
    assert not [s for s in asr_fx.find_sites(model, rule="norm-act") if s.module.startswith("bn")]


def drop_connect(inputs, p, training):
    if not training:
        return inputs
    keep = 1 - p
    mask = torch.floor(keep + torch.rand([inputs.shape[0], 1, 1, 1], dtype=inputs.dtype, device=inputs.device))
    return inputs / keep * mask


class _MBConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(2 * c)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * c)
        self.project = nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, inputs, drop_connect_rate=None):
        x = _Swish.apply(self.bn0(self.expand(inputs)))
        x = self.bn1(self.dw(x))
        x = x * torch.sigmoid(x)
        x = self.bn2(self.project(x))
        if drop_connect_rate:
            x = drop_connect(x, p=drop_connect_rate, training=self.training)
        return x + inputs


class _EfficientNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.ModuleList(_MBConv(8) for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = _Swish.apply(self.bn(self.stem(x)))
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=0.5 * i / len(self.blocks))
        return self.head(x.mean((2, 3)))


def test_blocks_calling_drop_connect_are_captured_and_follow_the_mode():
    torch.manual_seed(0)
    model = _EfficientNetLike().eval()
    x = torch.randn(4, 3, 8, 8)
    gm = asr_fx.passes.trace(model)
    assert gm.meta["asr_fx.mode_leaves"] == []  # no block kept as one call
    instrumented = asr_fx.instrument(model, example_inputs=(x,))
    assert {f"blocks_{i}_bn{j}" for i in range(3) for j in (0, 1)} <= set(instrumented.asr.keys())
    instrumented.train()
    torch.manual_seed(1)
    a = instrumented(x)
    torch.manual_seed(2)
    b = instrumented(x)
    assert not torch.allclose(a, b)  # drop_connect drops in train mode
    instrumented.eval()
    with torch.no_grad():
        assert torch.equal(instrumented(x), instrumented(x))
