"""timm: the instrumented model is timm's own ``ResNet`` with what timm's training scripts call on it:
``pretrained_cfg``, ``set_grad_checkpointing``, ``forward_features`` / ``forward_head``, ``reset_classifier``,
and ``timm.optim.create_optimizer_v2`` over it; a training step moves psi, and the fused model is timm's
``ResNet`` again. resnet18 (random weights, 5 classes) on 32x32 inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FUSE_RTOL,
    asr_values,
    assert_asr_trained,
    assert_own_model,
    assert_vanilla_form,
    rel_err,
    without_asr,
)

import asr_fx

timm = pytest.importorskip("timm")
from timm.optim import create_optimizer_v2  # noqa: E402


def _vanilla(num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=num_classes)


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), torch.arange(len(x)) % 5).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_timm_model_api_on_the_instrumented_model():
    vanilla = _vanilla()
    model = asr_fx.instrument(vanilla)
    assert_own_model(model, vanilla)
    assert model.pretrained_cfg == vanilla.pretrained_cfg and model.num_classes == 5
    x = _x()
    model.train()
    plain = _grads(model, x)
    model.set_grad_checkpointing(True)
    checkpointed = _grads(model, x)
    model.set_grad_checkpointing(False)
    assert set(checkpointed) == set(plain)
    for name, grad in plain.items():
        assert rel_err(grad, checkpointed[name]) <= 1e-4, name
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == vanilla.eval().forward_features(x).shape
        assert torch.equal(model.forward_head(features), model(x))
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model(x).shape == (4, 7)
    assert any(n.startswith("asr.") for n, _ in model.named_parameters())  # still instrumented


def test_timm_create_optimizer_v2_trains_psi_and_the_fused_model_is_timms():
    vanilla = _vanilla()
    model = asr_fx.instrument(vanilla)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in asr_fx.asr_parameters(model)} <= in_optimizer
    before = asr_values(model)
    x = _x()
    model.train()
    F.cross_entropy(model(x), torch.arange(4) % 5).backward()
    optimizer.step()
    assert_asr_trained(before, model)
    model.eval()
    with torch.no_grad():
        want = model(x)
        assert rel_err(want, without_asr(model, vanilla).eval()(x)) > 1e-3  # the trained blocks act
        fused = asr_fx.fuse(model, strict=True)
        assert_vanilla_form(fused, vanilla)
        assert rel_err(want, fused(x)) <= FUSE_RTOL
