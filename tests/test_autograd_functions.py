"""Custom autograd Functions stay opaque calls in capture, and instrument's self-check compares gradients."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asr_fx
from asr_fx.errors import EquivalenceError
from asr_fx.passes import trace
from asr_fx.passes.capture.autograd_functions import autograd_function_of


class _SignSTE(torch.autograd.Function):
    """Binarize: forward sign, backward straight through (clipped to |w| <= 1)."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return w.sign()

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


class _BinaryConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, _SignSTE.apply(self.weight), self.bias, self.stride, self.padding)


class _BinaryNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = _BinaryConv(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.conv(x)))
        return self.head(x.mean((2, 3)))


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


class _DomainNet(nn.Module):
    """A feature extractor trained adversarially through a gradient reversal layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.domain = nn.Linear(8, 2)

    def forward(self, x):
        feat = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.domain(_Reverse.apply(feat, 0.5))


class _Swish(torch.autograd.Function):
    """Memory-efficient swish: saves only its input, recomputes the sigmoid in backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s * (1 + x * (1 - s)))


class _SwishNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = _Swish.apply(self.bn1(self.conv1(x)))
        return _Swish.apply(self.bn2(self.conv2(x)))


_MODELS = [_BinaryNet, _DomainNet, _SwishNet]


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    torch.manual_seed(0)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", _MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("shape_aware", [False, True])
def test_a_function_call_is_one_node_of_the_traced_graph(make, shape_aware):
    x = torch.randn(2, 3, 8, 8)
    gm = trace(make(), example_inputs=(x,) if shape_aware else None)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and autograd_function_of(n.target)]
    assert calls, gm.graph
    assert all(issubclass(autograd_function_of(n.target), torch.autograd.Function) for n in calls)
    assert "sign" not in {n.target for n in gm.graph.nodes if n.op == "call_method"}


@pytest.mark.parametrize("make", _MODELS, ids=lambda m: m.__name__)
def test_the_instrumented_model_trains_like_the_model(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 3, 8, 8)
    instrumented = asr_fx.instrument(model, example_inputs=(x,))
    assert len(instrumented.asr) > 0
    for block in instrumented.asr.modules():  # v = 1: the instrumented model is the model
        if isinstance(block, asr_fx.ASR):
            block.attention_value = lambda b=block: torch.ones(b.broadcast_shape)
    want, got = _grads(model, x), _grads(instrumented, x)
    for name, grad in want.items():
        assert got[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


def test_the_binarized_conv_gets_the_straight_through_gradient():
    torch.manual_seed(0)
    instrumented = asr_fx.instrument(_BinaryNet(), example_inputs=(torch.randn(2, 3, 8, 8),))
    grads = _grads(instrumented, torch.randn(2, 3, 8, 8))
    assert grads["conv.weight"].abs().sum() > 0  # sign()'s own gradient is zero everywhere


@pytest.mark.parametrize("make", [_BinaryNet, _DomainNet], ids=lambda m: m.__name__)  # swish's backward is exact
def test_the_self_check_refuses_a_capture_that_loses_a_backward(make, monkeypatch):
    trace_module = sys.modules["asr_fx.passes.capture.trace"]
    monkeypatch.setattr(trace_module, "functions_kept_opaque", contextlib.nullcontext)  # inline, as torch.fx does
    with pytest.raises(EquivalenceError, match="does not train like the model"):
        asr_fx.instrument(make(), example_inputs=(torch.randn(2, 3, 8, 8),))


def test_function_apply_is_restored_after_tracing_also_when_tracing_fails():
    original = torch.autograd.Function.__dict__["apply"]

    class _Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: cannot be traced
                return _Swish.apply(x)
            return x

    with pytest.raises(asr_fx.TraceError):
        trace(_Bad())
    assert torch.autograd.Function.__dict__["apply"] is original
    x = torch.randn(3, requires_grad=True)
    assert isinstance(_Swish.apply(x), torch.Tensor)
