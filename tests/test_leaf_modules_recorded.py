"""The ``leaf_modules`` given to ``instrument`` are recorded in its config and used by ``fuse`` and the
checkpoint round trip, so they need not be given again."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import asr_fx
from asr_fx.leaf_spec import record_leaves, recorded_leaves


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it, a leaf keeps it as one call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.odd = DataDependent()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.odd(torch.relu(self.bn(self.conv(x)))))


def test_fuse_uses_the_leaf_modules_instrument_was_given() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = asr_fx.instrument(Net(), example_inputs=(x,), leaf_modules=[DataDependent, "head"])
    assert recorded_leaves(model) == [DataDependent, "head"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model.eval())  # no leaf_modules: the recorded ones (the trace stops at `odd`)
        deploy = asr_fx.fuse(model.eval(), fold_bn=True)  # BN folded into the conv: the graph itself
    assert isinstance(fused, Net)  # the module form: the user's class back
    with torch.no_grad():
        for result in (fused, deploy):
            assert (result(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()
    assert any(n.op == "call_module" and n.target == "odd" for n in deploy.graph.nodes)


def test_leaves_round_trip_as_plain_data() -> None:
    assert record_leaves([DataDependent, "a.b"]) == [f"{__name__}:DataDependent", "a.b"]
    assert record_leaves(lambda name, m: False) is None
    assert record_leaves(None) is None
