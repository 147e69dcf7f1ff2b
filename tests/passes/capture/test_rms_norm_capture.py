"""RMS norms written as a library writes them (a module of its own calling ``F.rms_norm`` on its own
weight, as timm's ``RmsNorm`` does) are captured as an ``nn.RMSNorm`` twin that makes the same call: the
layer rules see a norm, placement puts the paper's site after it, and the user's class keeps it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import asr_fx
from asr_fx.passes import trace
from asr_fx.passes.capture.plain_layers import CallingRMSNorm


class OwnRMSNorm(nn.Module):
    """Not a subclass of nn.RMSNorm: its own parameters, its own call (timm's and many hand-written ones)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.normalized_shape, self.eps = (dim,), eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class SandwichBlock(nn.Module):
    """A pre- and post-norm (sandwich) MLP block: the branch ends in an RMS norm."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.pre, self.post = OwnRMSNorm(dim), OwnRMSNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post(self.fc2(F.gelu(self.fc1(self.pre(x)))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(SandwichBlock(), SandwichBlock())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


def test_an_rms_norm_module_of_its_own_becomes_a_twin_making_the_same_call() -> None:
    model, x = Net().eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        model.blocks[0].post.weight.uniform_(0.5, 2)
    gm = trace(model)
    twin = gm.get_submodule("blocks.0.post")
    assert isinstance(twin, CallingRMSNorm) and twin.weight is model.blocks[0].post.weight
    assert [n.op for n in gm.graph.nodes if n.target == "blocks.0.post"] == ["call_module"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # the same call: exact
    assert isinstance(trace(gm).get_submodule("blocks.0.post"), CallingRMSNorm)  # traced again, it stays one


def test_sites_go_after_the_branch_rms_norm_and_fold_into_its_weight_in_the_users_class() -> None:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 5, 16)
    instrumented = asr_fx.instrument(model, example_inputs=(x,))
    assert type(instrumented) is Net
    sites = asr_fx.get_config(instrumented)["sites"]
    assert sorted(s["module"] for s in sites) == ["blocks.0.post", "blocks.1.post"]
    with torch.no_grad():
        for p in instrumented.asr.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # as if trained: the values are no longer the init's
        instrumented.eval()
        expected = instrumented(x)
    fused = asr_fx.fuse(instrumented, example_inputs=(x,))
    assert type(fused) is Net and asr_fx.count_parameters(fused) == asr_fx.count_parameters(model)
    assert not torch.equal(fused.blocks[0].post.weight, model.blocks[0].post.weight)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)


def test_a_call_on_the_module_weight_with_another_eps_is_left_as_code() -> None:
    class OtherEps(OwnRMSNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(x, self.normalized_shape, self.weight, 1e-3)  # not the module's own eps

    gm = trace(nn.Sequential(OtherEps(8)))
    assert not any(isinstance(m, CallingRMSNorm) for m in gm.modules())
