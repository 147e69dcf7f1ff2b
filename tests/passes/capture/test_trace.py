"""The trace pass: dropout-like calls keep following train()/eval() after tracing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

import asr_fx
from asr_fx.passes import trace


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop_path = StochasticDepth(0.5, "row")

    def forward(self, x):
        y = F.dropout(self.bn(self.conv(x)), 0.5, self.training)
        return x + self.drop_path(y)


def test_a_model_traced_in_train_mode_is_deterministic_in_eval_mode():
    torch.manual_seed(0)
    model = _Block().train()
    instrumented = asr_fx.instrument(model)  # auto: the residual rule sees through dropout and drop-path
    assert list(instrumented.asr.keys()) == ["bn"]
    x = torch.randn(8, 4, 6, 6)
    instrumented.eval()
    model.eval()
    with torch.no_grad():
        v = instrumented.asr.bn.attention_value()
        expected = x + model.bn(model.conv(x)) * v  # eval: no dropout, no dropped rows
        assert torch.allclose(instrumented(x), expected, atol=1e-6)
        fused = asr_fx.fuse(instrumented, strict=True)
        assert torch.allclose(fused(x), expected, atol=1e-6)
    instrumented.train()
    with torch.no_grad():
        assert not torch.equal(instrumented(x), instrumented(x))


def test_traced_graph_reads_the_training_flag():
    gm = trace(_Block().train())
    flags = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "training"]
    assert len(flags) == 1 and len(flags[0].users) == 2
    x = torch.randn(8, 4, 6, 6)
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))


class _TokenMixer(nn.Module):
    """Shape arithmetic a transformer does in Python: a dtype check, ``int(math.sqrt(n))``, ``(*shape, -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        if x.dtype != torch.float32:
            x = x.float()
        side = int(math.sqrt(x.shape[1]))
        grid = x.transpose(1, 2).reshape(*x.shape[:1], -1, side, side)
        tokens = grid.flatten(2).transpose(1, 2)
        return (tokens + self.proj(F.gelu(self.norm(tokens)))).reshape((*tokens.shape[:-1], -1))


class _NonzeroCount(nn.Module):
    def forward(self, x):
        if x.nonzero().shape[0] > 3:  # the size of nonzero()'s result depends on the values
            return x * 2
        return x


def test_shape_arithmetic_traces_with_example_inputs_and_keeps_the_batch_free():
    model = _TokenMixer().eval()
    x = torch.randn(2, 16, 8)
    gm = trace(model, example_inputs=(x,))
    for batch in (1, 3):  # the batch size was only passed on to reshape: still free
        other = torch.randn(batch, 16, 8)
        assert torch.allclose(gm(other), model(other), atol=1e-6)
    with pytest.raises(AssertionError, match="asr-fx captured this model for inputs where"):
        gm(torch.randn(2, 9, 8))  # sqrt(9) = 3, not 4: refused, never computed with the old grid
    instrumented = asr_fx.instrument(model, example_inputs=(x,)).eval()
    assert len(instrumented.asr) == 1
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=(x,))
    other = torch.randn(3, 16, 8)
    with torch.no_grad():
        assert torch.allclose(fused(other), instrumented(other), atol=1e-5)


def test_a_condition_on_tensor_values_is_still_refused():
    from asr_fx.errors import TraceError

    with pytest.raises(TraceError, match="depends on tensor values"):
        trace(_NonzeroCount(), example_inputs=(torch.randn(2, 4),), bind_training=False)


def test_a_bad_leaf_modules_item_names_it_and_the_accepted_forms():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(asr_fx.InvalidOptionError, match=r"leaf_modules takes module paths \(str\) or module classes, "
                                                        r"got 3 \(int\)"):
        asr_fx.instrument(model, leaf_modules=[3])
class _FactoryFromShape(nn.Module):
    """``torch.ones(batch, tokens)`` / ``torch.arange(tokens)`` from the input's shape (timm's Gemma4 patch
    embedding): torch's argument parser takes no proxy as a size."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):  # (B, N, 4)
        b, n = x.shape[0], x.shape[1]
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
        position = torch.arange(n, device=x.device).float().unsqueeze(-1)
        return self.proj(x) * valid.unsqueeze(-1) + position


def test_tensor_factories_with_traced_sizes_are_recorded_and_keep_the_batch_free():
    model, ones = _FactoryFromShape().eval(), torch.ones
    gm = trace(model, example_inputs=(torch.randn(2, 5, 4),))
    assert torch.ones is ones  # the patch lasts one trace
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ones in targets and torch.arange in targets
    for shape in ((2, 5, 4), (3, 7, 4)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x))


class _BufferExpand(nn.Module):
    """A buffer expanded to the input's batch (Gemma4's rotary ``inv_freq[None, :, None].expand(b, -1, 1)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freq", torch.arange(4.0), persistent=False)
        self.proj = nn.Linear(4, 4)

    def forward(self, x):  # (B, 4)
        return self.proj(x) * self.freq[None, :].expand(x.shape[0], -1)


def test_size_methods_of_an_untraced_tensor_with_traced_sizes_are_recorded():
    model, expand = _BufferExpand().eval(), torch.Tensor.expand
    gm = trace(model, example_inputs=(torch.randn(2, 4),))
    assert torch.Tensor.expand is expand
    assert "expand" in [n.target for n in gm.graph.nodes if n.op == "call_method"]
    for batch in (2, 5):
        x = torch.randn(batch, 4)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x))


class _CachesItsInputShape(nn.Module):
    """Caches ``x.shape`` on every call (YOLO's ``Detect`` caches ``self.shape`` and its anchors)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.seen: list = []

    def forward(self, x):
        self.last_shape = x.shape
        self.seen.append(x.shape)
        return self.conv(x)


@pytest.mark.parametrize("example", [None, (torch.randn(2, 3, 4, 4),)], ids=["plain", "shape-aware"])
def test_tracing_leaves_attributes_a_forward_caches_as_they_were(example):
    model = _CachesItsInputShape()
    gm = trace(model, example_inputs=example)
    assert not hasattr(model, "last_shape") and model.seen == []  # no tracer proxy left on the model
    assert isinstance(gm, torch.fx.GraphModule)
