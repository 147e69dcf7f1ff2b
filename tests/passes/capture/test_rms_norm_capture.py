"""RMS norm modules as libraries write them (calling ``F.rms_norm`` on their own weight, as timm's ``RmsNorm``
does, or spelled out in Python, as Llama's is) are recognised by what they compute and kept one call of an
``nn.RMSNorm`` twin running their own forward: the layer rules see a norm, placement puts the paper's site
after it, and the user's class keeps it. Inside a composite layer, the ``F.rms_norm`` call itself becomes a
twin making the same call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import asr_fx
from asr_fx.passes import trace
from asr_fx.passes.capture.plain_layers import WHOLE_MODULE_TWINS, CallingRMSNorm


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


def test_an_rms_norm_module_of_its_own_becomes_a_twin_running_its_own_forward() -> None:
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


class RMSNormAct(OwnRMSNorm):
    """A composite layer (timm's norm-act style): the RMS norm call, then an activation held as a child."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def test_the_rms_norm_call_inside_a_composite_layer_becomes_a_twin_with_the_activation_after_it() -> None:
    model, x = nn.Sequential(nn.Linear(8, 8), RMSNormAct(8)).eval(), torch.randn(2, 3, 8)
    gm = trace(model)
    twin = gm.get_submodule("1")
    assert type(twin) is CallingRMSNorm and twin.function is F.rms_norm and twin.weight is model[1].weight
    assert "1" not in gm.meta.get(WHOLE_MODULE_TWINS, ())  # the module's own output is after its activation
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "1.act"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_a_call_on_the_module_weight_with_another_eps_is_left_as_code() -> None:
    class OtherEps(OwnRMSNorm):
        """Also scales its output by a child's parameter: no RMS norm module as a whole either."""

        def __init__(self, dim: int) -> None:
            super().__init__(dim)
            self.gain = nn.Linear(1, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(x, self.normalized_shape, self.weight, 1e-3) * self.gain.weight  # not its own eps

    gm = trace(nn.Sequential(OtherEps(8)))
    assert not any(isinstance(m, CallingRMSNorm) for m in gm.modules())


class SpelledRMSNorm(nn.Module):
    """Llama's spelling: float32 math, ``rsqrt`` of the mean square, the weight multiplied last."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden.to(dtype)


class OnePlusWeightRMSNorm(SpelledRMSNorm):
    """Gemma's spelling: the output scales with ``1 + weight``, not with the weight: no fold into it."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return normed * (1.0 + self.weight)


class SpelledBlock(SandwichBlock):
    def __init__(self, dim: int = 16, norm: type[nn.Module] = SpelledRMSNorm) -> None:
        super().__init__(dim)
        self.pre, self.post = norm(dim), norm(dim)


def test_spelled_out_rms_norm_modules_are_one_call_of_a_twin_running_their_own_forward() -> None:
    model, x = nn.Sequential(SpelledBlock(), SpelledBlock()).eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        model[0].post.weight.uniform_(0.5, 2)
    gm = trace(model)
    twin = gm.get_submodule("0.post")
    assert isinstance(twin, nn.RMSNorm) and twin.weight is model[0].post.weight
    assert [n.op for n in gm.graph.nodes if n.target == "0.post"] == ["call_module"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # the module's own forward: exact


class SpelledNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(SpelledBlock(), SpelledBlock())


def test_spelled_out_rms_norm_takes_the_site_and_the_fold_in_the_users_class() -> None:
    torch.manual_seed(0)
    model, x = SpelledNet().eval(), torch.randn(2, 5, 16)
    instrumented = asr_fx.instrument(model, example_inputs=(x,))
    assert type(instrumented) is SpelledNet
    assert sorted(s["module"] for s in asr_fx.get_config(instrumented)["sites"]) == ["blocks.0.post", "blocks.1.post"]
    with torch.no_grad():
        for p in instrumented.asr.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        instrumented.eval()
        expected = instrumented(x)
    fused = asr_fx.fuse(instrumented, example_inputs=(x,))
    assert type(fused) is SpelledNet and type(fused.blocks[0].post) is SpelledRMSNorm
    assert not torch.equal(fused.blocks[0].post.weight, model.blocks[0].post.weight)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)


def test_a_norm_whose_output_does_not_scale_with_its_weight_stays_code() -> None:
    gm = trace(nn.Sequential(SpelledBlock(norm=OnePlusWeightRMSNorm)))
    assert not any(isinstance(m, nn.RMSNorm) for m in gm.modules())
