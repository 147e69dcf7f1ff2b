"""instrument -> train -> fuse -> ONNX -> verify on torchvision ResNets and ResNet-164."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import FUSE_RTOL, ORT_RTOL, n_params, perturb_asr, rel_err, train_step
from torchvision.models.resnet import BasicBlock, Bottleneck

import asr_fx
from asr_fx.models import resnet164
from asr_fx.models.resnet_cifar import Bottleneck as CifarBottleneck

MODELS = {
    "resnet18": (torchvision.models.resnet18, (2, 3, 64, 64)),
    "resnet50": (torchvision.models.resnet50, (2, 3, 64, 64)),
    "resnet164": (resnet164, (2, 3, 32, 32)),
}


def _expected_sites(model: torch.nn.Module) -> list[str]:
    """The paper's place: the last BN of each residual block's branch (bn2 basic, bn3 bottleneck)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, BasicBlock):
            out.append(f"{name}.bn2")
        elif isinstance(m, (Bottleneck, CifarBottleneck)):
            out.append(f"{name}.bn3")
    return out


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    torch.manual_seed(0)
    factory, shape = MODELS[request.param]
    vanilla = factory().eval()
    model = asr_fx.instrument(vanilla)
    return request.param, vanilla, model, torch.randn(shape)


def test_one_site_per_residual_block_at_the_papers_place(case):
    _, vanilla, model, _ = case
    sites = asr_fx.get_config(model)["sites"]
    assert [s["module"] for s in sites] == _expected_sites(vanilla)
    assert all(s["rule"] == "residual" for s in sites)
    names = {n for n, _ in model.named_modules()}
    assert {f"asr.{s['module'].replace('.', '_')}" for s in sites} <= names


def test_training_step_moves_psi(case):
    _, _, model, x = case
    key = asr_fx.get_config(model)["sites"][0]["module"].replace(".", "_")
    before = model.asr[key].psi.detach().clone()
    train_step(model, x[:2])
    assert not torch.equal(before, model.asr[key].psi)
    model.eval()


def test_fuse_is_equivalent_with_vanilla_parameter_count(case):
    _, vanilla, model, x = case
    perturb_asr(model)
    model.eval()
    fused = asr_fx.fuse(model, strict=True)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert rel_err(ref, out) <= FUSE_RTOL
    assert n_params(fused) == n_params(vanilla) < n_params(model)
    assert not any("asr" in n for n, _ in fused.named_modules())
    report = asr_fx.fusion_report(fused)
    assert report.summary() == {"bn": len(asr_fx.get_config(model)["sites"])}


def test_onnx_matches_vanilla_ops_and_onnxruntime_agrees(case, tmp_path):
    _, vanilla, model, x = case
    model.eval()
    fused = asr_fx.fuse(model, strict=True)
    x1 = x[:1]
    vanilla_report = asr_fx.export_onnx(vanilla, tmp_path / "vanilla.onnx", x1)
    report = asr_fx.export_onnx(fused, tmp_path / "fused.onnx", x1, reference=model, rtol=ORT_RTOL)
    assert report.verified and report.ok
    assert report.outputs[0].max_rel <= ORT_RTOL
    assert report.op_counts == vanilla_report.op_counts
    assert "Mul" not in report.op_counts and "Sigmoid" not in report.op_counts
    assert report.param_count == n_params(vanilla)


def test_fuse_does_not_mutate_its_input():
    model = asr_fx.instrument(resnet164()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    asr_fx.fuse(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(n.startswith("asr.") for n, _ in model.named_modules())


def test_instrument_does_not_mutate_its_input_and_keeps_state_dict_names():
    vanilla = torchvision.models.resnet18()
    keys = set(vanilla.state_dict())
    model = asr_fx.instrument(vanilla)
    assert set(vanilla.state_dict()) == keys
    extra = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert extra and all(k.startswith("asr.layer") for k in extra)
    assert "asr.layer1_0_bn2.psi" in extra
    assert torch.allclose(model.asr.layer1_0_bn2.psi, torch.full((1, 64, 1, 1), 0.1))
