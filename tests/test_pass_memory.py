"""The passes stay near the model's own memory: ``instrument`` and ``fuse`` each copy the model at most
once, folds write into the private copy's tensors (never into tensors someone else may hold), and
the instrument check leaves the result as it was. (Peak memory itself is a benchmark:
``tools/bench_passes.py --big``.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import asr_fx
from asr_fx.models import cifar_resnet
from asr_fx.passes.layers.base import folding_in_place, replace_tensor


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture()
def whole_copies(monkeypatch):
    """Counts ``copy.deepcopy`` calls on modules at least half the size of the model under test."""
    calls: list[int] = []
    real = copy.deepcopy
    size = {"min": 0}

    def counting(obj, memo=None, _nil=[]):  # noqa: B006 - copy.deepcopy's own signature
        if memo is None and isinstance(obj, nn.Module) and _params(obj) >= size["min"] > 0:
            calls.append(_params(obj))
        return real(obj, memo)

    monkeypatch.setattr(copy, "deepcopy", counting)
    return calls, size


def test_instrument_and_fuse_each_copy_the_model_once(whole_copies):
    calls, size = whole_copies
    torch.manual_seed(0)
    model = cifar_resnet(depth=20)
    size["min"] = _params(model) // 2
    x = torch.randn(2, 3, 32, 32)
    instrumented = asr_fx.instrument(model, example_inputs=(x,))
    assert len(calls) == 1, calls
    calls.clear()
    instrumented.eval()
    asr_fx.fuse(instrumented, example_inputs=(x,))
    assert len(calls) == 1, calls


def test_the_instrument_check_leaves_the_result_as_it_was():
    torch.manual_seed(0)
    x, vanilla = torch.randn(2, 3, 32, 32), cifar_resnet(depth=11)
    torch.manual_seed(1)
    checked = asr_fx.instrument(vanilla, example_inputs=(x,))
    torch.manual_seed(1)
    unchecked = asr_fx.instrument(vanilla, example_inputs=(x,), check=False)
    blocks = [m for m in checked.modules() if isinstance(m, asr_fx.ASR)]
    assert blocks and all("attention_value" not in vars(b) for b in blocks)  # v = 1 was for the check only
    for (key, a), b in zip(checked.state_dict().items(), unchecked.state_dict().values()):
        assert torch.equal(a, b), key  # BN statistics of the train-mode check restored
    with torch.no_grad():
        torch.testing.assert_close(checked.eval()(x), unchecked.eval()(x), rtol=0, atol=0)


def test_replace_tensor_writes_in_place_only_inside_folding_in_place():
    layer = nn.Linear(4, 3)
    weight = layer.weight
    replace_tensor(layer, "weight", layer.weight * 2)
    assert layer.weight is not weight and isinstance(layer.weight, nn.Parameter)  # default: a new tensor
    weight = layer.weight
    before = weight.detach().clone()
    with folding_in_place():
        replace_tensor(layer, "weight", layer.weight * 2)
    assert layer.weight is weight and torch.equal(weight.detach(), before * 2)  # the same tensor, new values
    with folding_in_place():
        replace_tensor(layer, "weight", torch.ones(6, 2))  # does not fit: replaced
    assert layer.weight is not weight and layer.weight.shape == (6, 2)


def test_fuse_folds_into_its_copy_and_leaves_the_given_model_unchanged():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    instrumented = asr_fx.instrument(cifar_resnet(depth=11), example_inputs=(x,)).eval()
    with torch.no_grad():
        for key, p in instrumented.named_parameters():
            if key.endswith(".psi"):
                p.add_(0.5)
    before = {k: v.clone() for k, v in instrumented.state_dict().items()}
    fused = asr_fx.fuse(instrumented, example_inputs=(x,))
    for key, value in instrumented.state_dict().items():
        assert torch.equal(value, before[key]), key
    shared = {p.data_ptr() for p in instrumented.parameters()} & {p.data_ptr() for p in fused.parameters()}
    assert not shared
    with torch.no_grad():
        torch.testing.assert_close(fused(x), instrumented(x), rtol=1e-5, atol=1e-5)


def _instrumented_in_place(x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = asr_fx.instrument(cifar_resnet(depth=11).eval(), example_inputs=(x,), inplace=True)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith(".psi"):
                p.add_(0.5)
    return model.eval()


def test_fuse_in_place_folds_into_the_models_own_tensors_without_a_copy(whole_copies):
    calls, size = whole_copies
    x = torch.randn(2, 3, 32, 32)
    model = _instrumented_in_place(x)
    size["min"] = _params(model) // 2
    with torch.no_grad():
        want = model(x)
    tensors = {key: p for key, p in model.named_parameters() if ".asr." not in f".{key}" and not key.startswith("asr.")}
    fused = asr_fx.fuse(model, example_inputs=(x,), inplace=True)
    assert fused is model and not calls  # no whole copy
    assert {key: p for key, p in fused.named_parameters()} == tensors  # the very tensors, folded in place
    with torch.no_grad():
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)


def test_a_refused_fuse_in_place_leaves_the_model_as_it_was(monkeypatch):
    x = torch.randn(2, 3, 32, 32)
    model = _instrumented_in_place(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}
    with torch.no_grad():
        want = model(x)

    def refuse(*args, **kwargs):
        raise asr_fx.EquivalenceError("refused after the folds")

    monkeypatch.setattr("asr_fx.api.check_fused", refuse)
    with pytest.raises(asr_fx.EquivalenceError, match="refused after the folds"):
        asr_fx.fuse(model, example_inputs=(x,), inplace=True)
    assert model.state_dict().keys() == before.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the folded tensors are put back, bit for bit
    assert {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()} == hooks
    with torch.no_grad():
        assert torch.equal(model(x), want)


class _ChosenForward(nn.Module):
    """Chooses its forward in __init__ (``self.forward = self.forward_split``), as timm's FasterNet does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.forward = self.forward_split

    def forward_split(self, x):
        a, b = torch.split(x, [2, 2], dim=1)
        return torch.cat((self.conv(a), b), 1)


@pytest.mark.parametrize("layer", [lambda: nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 1)),
                                   _ChosenForward], ids=["weight_norm", "forward-on-instance"])
def test_fuse_copies_the_module_tree_of_unusual_layers(layer):
    """The module tree is copied class by class, not through copy.copy (a parametrized module refuses
    pickling), and an instance-level bound method (``self.forward = self.forward_split``) is rebound to the
    copy, so the trace calls the copy's layers."""
    torch.manual_seed(0)
    vanilla = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), layer(),
                            nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 8, 8)
    instrumented = asr_fx.instrument(vanilla.eval(), example_inputs=(x,)).eval()
    with torch.no_grad():
        for key, p in instrumented.named_parameters():
            if key.endswith(".psi"):
                p.add_(0.5)
    fused = asr_fx.fuse(instrumented, example_inputs=(x,))
    assert type(fused) is nn.Sequential
    with torch.no_grad():
        torch.testing.assert_close(fused(x), instrumented(x), rtol=1e-5, atol=1e-5)
