"""The trace pass: dropout-like calls keep following train()/eval() after tracing."""

from __future__ import annotations

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
