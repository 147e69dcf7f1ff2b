"""instrument returns the user's own model (same class, attributes, methods, kwargs); fuse returns that class."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSE_RTOL, perturb_asr, rel_err
from torch import nn

import asr_fx
from asr_fx.errors import ASRError
from asr_fx.models import cifar_resnet
from asr_fx.passes.forms.module_form import ASRBatchNorm2d, ASRHook, attachments
from asr_fx.passes.forms.output_form import APPLY, ASROutput

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def asr_hooks(model: nn.Module) -> list[ASRHook]:
    """Every block application outside BatchNorm: the output forms' (and earlier versions' forward hooks)."""
    return [h for m in model.modules() for h in (*m._forward_hooks.values(), m.__dict__.get(APPLY))
            if isinstance(h, ASRHook)]


def assert_vanilla(fused: nn.Module, vanilla: nn.Module) -> None:
    """``fused`` is ``vanilla``'s class with its state_dict keys, no ASR block, hook or BN form left."""
    assert type(fused) is type(vanilla)
    assert list(fused.state_dict()) == list(vanilla.state_dict())
    assert not asr_hooks(fused) and not any(isinstance(m, (asr_fx.ASR, ASRBatchNorm2d, ASROutput))
                                            for m in fused.modules())
    assert asr_fx.asr_config(fused) is None


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    vanilla = cifar_resnet(depth=11).eval()
    model = asr_fx.instrument(vanilla, bn_affine_form=False)
    model.eval()
    perturb_asr(model)
    return vanilla, model


def test_the_instrumented_model_is_the_users_class_with_vanilla_keys_plus_asr(resnet):
    vanilla, model = resnet
    assert type(model) is type(vanilla) and model is not vanilla
    keys, vanilla_keys = list(model.state_dict()), list(vanilla.state_dict())
    assert [k for k in keys if not k.startswith("asr.")] == vanilla_keys
    assert all(k.startswith("asr.") for k in keys[len(vanilla_keys):]) and len(keys) > len(vanilla_keys)
    assert len(asr_hooks(model)) == len(model.asr) and not asr_hooks(vanilla)  # the input is left alone
    assert asr_fx.asr_config(model).form == "module"


def test_fuse_returns_the_users_class_computing_what_the_instrumented_model_computes(resnet):
    vanilla, model = resnet
    fused = asr_fx.fuse(model)
    assert_vanilla(fused, vanilla)
    with torch.no_grad():
        assert rel_err(model(X), fused(X)) <= FUSE_RTOL
        assert rel_err(model(X), vanilla(X)) > 1e-3  # the blocks were not the identity
    assert asr_hooks(model) and hasattr(model, "asr")  # fuse left its input alone
    assert asr_fx.fusion_report(fused).summary() == {"bn": len(model.asr)}


def test_deepcopy_and_torch_save_keep_the_blocks_their_own(resnet):
    _, model = resnet
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        ref = model(X)
        for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            assert torch.equal(copied.eval()(X), ref)
            hook_blocks = {id(h.block) for h in asr_hooks(copied)}
            assert hook_blocks == {id(b) for b in copied.asr.values()}  # the copy's hooks hold the copy's blocks
            for p in copied.asr.parameters():
                p.add_(1.0)
            assert not torch.equal(copied(X), ref) and torch.equal(model(X), ref)


def test_inplace_instruments_and_fuses_the_very_object():
    torch.manual_seed(0)
    vanilla = cifar_resnet(depth=11).eval()
    reference = copy.deepcopy(vanilla)
    model = asr_fx.instrument(vanilla, inplace=True)
    assert model is vanilla and isinstance(model.get_submodule("layer1.0.bn3"), ASRBatchNorm2d)
    perturb_asr(model)
    with torch.no_grad():
        want = model.eval()(X)
    fused = asr_fx.fuse(model, inplace=True)
    assert fused is vanilla
    assert_vanilla(fused, reference)
    with torch.no_grad():
        assert rel_err(want, fused(X)) <= FUSE_RTOL


class WithOptions(nn.Module):
    """A model whose forward takes optional keyword arguments that change what it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.note = "kept"

    def forward(self, x, labels=None, return_features=False):
        features = torch.relu(self.bn(self.conv(x)))
        logits = self.head(features.mean((2, 3)))
        if labels is not None:
            return nn.functional.cross_entropy(logits, labels), logits
        return (logits, features) if return_features else logits

    def describe(self) -> str:
        return f"{type(self).__name__}:{self.note}"


def test_keyword_arguments_are_not_specialised():
    vanilla = WithOptions().eval()
    model = asr_fx.instrument(vanilla, example_inputs=(X,))
    assert isinstance(model, WithOptions) and model.describe() == "WithOptions:kept"
    perturb_asr(model)
    labels = torch.tensor([1, 3])
    loss, logits = model.train()(X, labels=labels)
    loss.backward()
    assert model.asr["bn"].psi.grad is not None
    logits, features = model.eval()(X, return_features=True)
    assert features.shape == (2, 8, 32, 32)
    fused = asr_fx.fuse(model, example_inputs=(X,))
    assert_vanilla(fused, vanilla)
    with torch.no_grad():
        assert rel_err(model(X, labels=labels)[0], fused(X, labels=labels)[0]) <= FUSE_RTOL


def test_a_sequential_keeps_its_layers_and_length():
    vanilla = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    model = asr_fx.instrument(vanilla, sites=["1"])
    assert isinstance(model, nn.Sequential) and len(model) == 4 and [type(m) for m in model] == \
        [nn.Conv2d, ASRBatchNorm2d, nn.ReLU, nn.Conv2d]
    perturb_asr(model)
    fused = asr_fx.fuse(model, example_inputs=(X,))
    assert_vanilla(fused, vanilla)
    with torch.no_grad():
        assert rel_err(model.eval()(X), fused(X)) <= FUSE_RTOL


class ParallelBranches(nn.Module):
    """A sum of two conv-BN branches (RepVGG-like): the site is the sum, functional code."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))


def test_a_functional_site_falls_back_to_the_graph_form_and_says_why():
    sites = [s.node for s in asr_fx.find_sites(ParallelBranches()) if not s.module]
    assert sites, "the parallel sum is a site"
    with pytest.warns(UserWarning, match="returns a GraphModule.*functional code"):
        model = asr_fx.instrument(ParallelBranches(), sites=sites)
    assert isinstance(model, torch.fx.GraphModule)
    assert "functional code" in asr_fx.asr_config(model).graph_reason
    with pytest.raises(ASRError, match=r"inplace=True\) cannot keep ParallelBranches"):
        asr_fx.instrument(ParallelBranches(), sites=sites, inplace=True)


def test_a_failed_check_leaves_an_inplace_model_as_it_was(monkeypatch):
    vanilla = cifar_resnet(depth=11).eval()
    monkeypatch.setattr("asr_fx.instrument_model.check_instrumented",
                        lambda *a: (_ for _ in ()).throw(asr_fx.EquivalenceError("refused")))
    with pytest.raises(asr_fx.EquivalenceError):
        asr_fx.instrument(vanilla, inplace=True)
    assert not asr_hooks(vanilla) and not hasattr(vanilla, "asr")
    assert not any(isinstance(m, ASRBatchNorm2d) for m in vanilla.modules()) and asr_fx.asr_config(vanilla) is None


def test_fuse_of_a_model_trained_one_step_matches_in_eval():
    torch.manual_seed(0)
    model = asr_fx.instrument(cifar_resnet(depth=11))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(X).square().mean().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        fused = asr_fx.fuse(model)
    with torch.no_grad():
        assert rel_err(model.eval()(X), fused(X)) <= FUSE_RTOL


class WithParallelBlock(nn.Module):
    """A model whose functional site (a parallel sum) is inside a child: that child is captured alone."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.block = ParallelBranches()
        self.label = "outer"

    def forward(self, x, scale: float = 1.0):
        return self.block(self.stem(x)) * scale


def test_a_functional_site_inside_a_child_is_captured_there_and_the_model_keeps_its_class():
    vanilla = WithParallelBlock().eval()
    chosen = asr_fx.find_sites(vanilla, example_inputs=(X,))
    with pytest.warns(UserWarning, match=r"captures \['block'\] as GraphModules inside it"):
        model = asr_fx.instrument(vanilla, example_inputs=(X,))
    assert type(model) is WithParallelBlock and isinstance(model.block, torch.fx.GraphModule)
    assert len(asr_fx.asr_config(model).sites) == len(chosen) and model.label == "outer"
    perturb_asr(model)
    fused = asr_fx.fuse(model.eval(), example_inputs=(X,))
    assert type(fused) is WithParallelBlock and not any(".asr." in k for k in fused.state_dict())
    with torch.no_grad():
        assert rel_err(model(X, scale=2.0), fused(X, scale=2.0)) <= FUSE_RTOL


class NormAct(nn.BatchNorm2d):
    """A composite layer (timm's BatchNormAct2d): its own BatchNorm, then an activation, in one module."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return torch.relu(x)


class CompositeWithLayerScale(nn.Module):
    """A composite norm-act site, and a layer scale read through a reshape (ConvNeXt's gamma)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = NormAct(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.head(y + self.conv2(y).mul(self.gamma.reshape(1, -1, 1, 1)))


def test_a_composite_layer_scales_its_own_norm_output_and_a_layer_scale_stays_the_models():
    vanilla = CompositeWithLayerScale().eval()
    model = asr_fx.instrument(vanilla, sites=["bn", "conv2"], example_inputs=(X,))
    assert type(model) is CompositeWithLayerScale and isinstance(model.bn, NormAct)
    assert sorted(a.kind for a in attachments(model)) == ["affine", "output"]
    perturb_asr(model)
    train_out = model.train()(X)  # the norm in train mode: batch statistics of the unscaled input
    train_out.sum().backward()
    assert model.asr["bn"].psi.grad is not None and "weight" not in model.bn.__dict__  # the scaled copy is gone
    fused = asr_fx.fuse(model.eval(), example_inputs=(X,))
    assert_vanilla(fused, vanilla)
    assert torch.equal(fused.gamma, torch.ones(8))  # the scale went into conv2: the vanilla forward multiplies by 1
    with torch.no_grad():
        assert rel_err(model(X), fused(X)) <= FUSE_RTOL
        assert rel_err(model(X), vanilla(X)) > 1e-3
