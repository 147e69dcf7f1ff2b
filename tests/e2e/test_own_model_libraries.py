"""The own-model form on library models built from configs (random weights, offline): the instrumented model
is the library's class with its methods and keyword arguments, and fuse gives that class back."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSE_RTOL, assert_same_detections, perturb_asr, rel_err
from torch import nn

import asr_fx
from asr_fx.passes.forms.module_form import ASRHook
from asr_fx.passes.forms.output_form import ASROutput


def asr_attached(model: nn.Module) -> bool:
    return any(isinstance(h, ASRHook) for m in model.modules() for h in m._forward_hooks.values()) or \
        any(type(m).__name__.startswith("ASRBatchNorm") or isinstance(m, ASROutput) for m in model.modules())


def check_round_trip(vanilla: nn.Module, model: nn.Module, inputs: tuple) -> nn.Module:
    """``model`` is ``vanilla``'s class; fused it is ``vanilla``'s class again with the vanilla keys, and
    computes what ``model`` computes in eval mode."""
    assert isinstance(model, type(vanilla)) and asr_attached(model)
    perturb_asr(model)
    model.eval()
    fused = asr_fx.fuse(model, example_inputs=inputs)
    assert type(fused) is type(vanilla) and not asr_attached(fused)
    assert list(fused.state_dict()) == list(vanilla.state_dict())
    return fused


def test_timm_resnet_keeps_its_methods():
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 64, 64)
    vanilla = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    model = asr_fx.instrument(vanilla, example_inputs=(x,))
    assert model.pretrained_cfg == vanilla.pretrained_cfg
    assert model.forward_features(x).shape == vanilla.forward_features(x).shape
    model.set_grad_checkpointing(True)
    model.train()(x).sum().backward()  # checkpointed blocks re-run their hooks
    assert model.asr[next(iter(model.asr))].psi.grad is not None
    model.set_grad_checkpointing(False)
    fused = check_round_trip(vanilla, model, (x,))
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL
    model.reset_classifier(5)
    assert model.eval()(x).shape == (2, 5)


def test_transformers_classifier_takes_labels_and_returns_its_output_type():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)
    vanilla = transformers.ResNetForImageClassification(config).eval()
    x = torch.randn(2, 3, 64, 64)
    model = asr_fx.instrument(vanilla, example_inputs=(x,))
    assert model.config.to_dict() == vanilla.config.to_dict() and hasattr(model, "save_pretrained")
    out = model.train()(pixel_values=x, labels=torch.tensor([0, 4]))
    assert type(out).__name__ == "ImageClassifierOutputWithNoAttention" and out.loss is not None
    out.loss.backward()
    hidden = model.eval()(x, output_hidden_states=True, return_dict=True).hidden_states
    assert hidden is not None and len(hidden) == len(vanilla(x, output_hidden_states=True).hidden_states)
    fused = check_round_trip(vanilla, model, (x,))
    with torch.no_grad():
        assert rel_err(model(x).logits, fused(x).logits) <= FUSE_RTOL
        assert fused(x, labels=torch.tensor([1, 2])).loss is not None


def test_ultralytics_detection_model_keeps_loss_stride_and_yaml():
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    vanilla = DetectionModel("yolov8n.yaml", verbose=False).eval()
    x = torch.randn(1, 3, 64, 64)
    model = asr_fx.instrument(vanilla, example_inputs=(x,))
    assert torch.equal(model.stride, vanilla.stride) and model.yaml == vanilla.yaml and callable(model.loss)
    fused = check_round_trip(vanilla, model, (x,))
    with torch.no_grad():
        assert rel_err(model(x)[0], fused(x)[0]) <= FUSE_RTOL


@pytest.mark.slow
def test_torchvision_detector_trains_with_targets_and_fuses_into_its_class():
    torchvision = pytest.importorskip("torchvision")
    vanilla = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=96).eval()
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(0))]
    model = asr_fx.instrument(vanilla, example_inputs=(images,))
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}]
    losses = model.train()(images, targets)
    assert isinstance(losses, dict) and "loss_classifier" in losses
    sum(losses.values()).backward()
    fused = check_round_trip(vanilla, model, (images,))
    with torch.no_grad():
        want = model(images)
        assert_same_detections(fused(images), want, len(want[0]["boxes"]))
