"""The gradient half of instrument's self-check catches a wrong or a missing gradient, in small parameters
(compared element by element) and large ones (compared through signed block sums), and leaves every
``.grad`` and ``requires_grad`` as the user had them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import asr_fx
from asr_fx import gradient_check
from asr_fx.gradient_check import EXACT_MAX, GRAD_RTOL, gradient_mismatch
from asr_fx.models import cifar_resnet

X = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))


def _one_element_off(param: nn.Parameter, by: float) -> torch.utils.hooks.RemovableHandle:
    """A hook that moves one element of ``param``'s gradient by ``by`` times its largest value."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[grad.numel() // 3] += by * grad.abs().max()
        return grad

    return param.register_hook(hook)


def test_two_copies_of_a_model_agree():
    model = _mlp()
    assert gradient_mismatch(model, copy.deepcopy(model), (X,)) == ""


@pytest.mark.parametrize("layer", ["2", "4"], ids=["large-block-sums", "small-exact"])
def test_one_wrong_element_of_a_gradient_is_caught(layer):
    model = _mlp()
    checked = copy.deepcopy(model)
    weight = checked.get_submodule(layer).weight
    assert (weight.numel() > EXACT_MAX) == (layer == "2")  # both ways of comparing are exercised
    _one_element_off(weight, 10 * GRAD_RTOL)
    assert f"the gradient of `{layer}.weight` differs" in gradient_mismatch(model, checked, (X,))


def test_a_move_within_the_tolerance_passes():
    model = _mlp()
    checked = copy.deepcopy(model)
    _one_element_off(checked.get_submodule("2").weight, GRAD_RTOL / 10)
    assert gradient_mismatch(model, checked, (X,)) == ""


def test_a_gradient_the_checked_model_loses_is_caught():
    model = _mlp()
    checked = copy.deepcopy(model)
    checked[0].weight.register_hook(torch.zeros_like)
    assert "get a gradient in the model but none" in gradient_mismatch(model, checked, (X,))


def test_a_wrong_sign_everywhere_is_caught():
    model = _mlp()
    checked = copy.deepcopy(model)
    checked[4].weight.register_hook(torch.neg)
    assert "the gradient of `4.weight` differs" in gradient_mismatch(model, checked, (X,))


def test_the_check_leaves_grad_and_requires_grad_as_they_were():
    torch.manual_seed(0)
    vanilla = cifar_resnet(depth=11)
    x = torch.randn(2, 3, 32, 32)
    vanilla(x).sum().backward()  # the user's own gradients, to be kept
    frozen = [p for n, p in vanilla.named_parameters() if n.startswith("layer1")]
    for p in frozen:
        p.requires_grad_(False)
    vanilla.conv1.weight.grad = None  # one without a gradient
    before = {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in vanilla.named_parameters()}
    grads = {n: p.grad for n, p in vanilla.named_parameters()}
    instrumented = asr_fx.instrument(vanilla, example_inputs=(x,))
    for name, p in vanilla.named_parameters():
        requires_grad, grad = before[name]
        assert p.requires_grad == requires_grad, name
        assert p.grad is grads[name], name  # the very tensor, not a copy
        assert (grad is None) == (p.grad is None) and (grad is None or torch.equal(grad, p.grad)), name
        assert p._post_accumulate_grad_hooks is None, name  # the check's hooks leave no trace
    for name, p in instrumented.named_parameters():
        assert p.grad is None or name in before, name  # the check left no gradient on the result's new tensors
        if name in before:
            assert p.requires_grad == before[name][0], name


def test_activations_on_disk_give_the_same_gradients(monkeypatch):
    model = _mlp()
    names = [n for n, _ in model.named_parameters()]

    def gradients() -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        gradient_check._stream_gradients(model, (X,), names, lambda n, g: got.__setitem__(n, g.clone()))
        return got

    in_memory = gradients()
    monkeypatch.setattr(gradient_check, "OFFLOAD_BYTES", 0)
    written: list[int] = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda value, path: (written.append(1), real_save(value, path))[1])
    on_disk = gradients()
    assert written  # activations did go to disk
    assert in_memory.keys() == on_disk.keys() == set(names)
    for name in names:
        assert torch.equal(in_memory[name], on_disk[name]), name


def test_instrument_in_place_checks_gradients_and_leaves_the_model_on_a_wrong_one(monkeypatch):
    torch.manual_seed(0)
    vanilla = cifar_resnet(depth=11).eval()
    x = torch.randn(2, 3, 32, 32)
    keys = list(vanilla.state_dict())
    real = gradient_check.record_mismatch

    def with_a_wrong_gradient(record, checked, inputs):
        handle = checked.conv1.weight.register_hook(lambda g: g * 2)
        try:
            return real(record, checked, inputs)
        finally:
            handle.remove()

    monkeypatch.setattr(gradient_check, "record_mismatch", with_a_wrong_gradient)
    with pytest.raises(asr_fx.EquivalenceError, match="does not train like the model: the gradient of `conv1.weight`"):
        asr_fx.instrument(vanilla, example_inputs=(x,), inplace=True)
    assert list(vanilla.state_dict()) == keys and not hasattr(vanilla, "asr")
