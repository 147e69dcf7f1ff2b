"""Placement outside the paper's blocks (``auto``): plain stretches past the first residual block get
``norm-act``, the stem none; a feature pyramid's norm-free lateral and output convs get ``neck``; a
prediction conv gets none. Each model fuses back to the instrumented one's outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from conftest import fuse_detector_checked, perturb_asr, rel_err
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import asr_fx


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Block(nn.Module):
    """A ResNet basic block: the paper's residual site is ``bn2``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class NeckAfterResidual(nn.Module):
    """Stem conv-bn-relu, two residual blocks, then a plain neck (conv-bn-relu x2, a strided transition)
    and a segmentation-style head whose last conv predicts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.neck = nn.Sequential(_cbr(8, 12), _cbr(12, 12))
        self.head = nn.Sequential(nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.blocks(self.stem(x))))


def _instrument_and_fuse(model: nn.Module, x):
    inputs = x if isinstance(x, tuple) else (x,)
    inst = asr_fx.instrument(model.eval(), example_inputs=inputs)
    perturb_asr(inst)
    inst.eval()
    fused = asr_fx.fuse(inst, strict=True, example_inputs=inputs)
    with torch.no_grad():
        return inst, fused, model(*inputs), inst(*inputs), fused(*inputs)


def test_plain_stretch_after_a_residual_block_gets_norm_act_and_the_stem_none():
    torch.manual_seed(0)
    model, x = NeckAfterResidual(), torch.randn(2, 3, 16, 16)
    sites = asr_fx.find_sites(model, example_inputs=(x,), existing=False)
    assert [(s.module, s.rule) for s in sites] == [
        ("blocks.0.bn2", "residual"), ("blocks.1.bn2", "residual"),
        ("neck.0.1", "norm-act"), ("neck.1.1", "norm-act"), ("head.1", "norm-act")]
    inst, fused, vanilla, want, got = _instrument_and_fuse(model, x)
    assert [s["module"] for s in asr_fx.get_config(inst)["sites"]] == [s.module for s in sites]
    assert rel_err(vanilla, want) > 1e-3  # the blocks act
    assert rel_err(want, got) <= 1e-5
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())


def test_a_model_without_residual_blocks_keeps_norm_act_everywhere_stem_included():
    torch.manual_seed(0)
    model = nn.Sequential(_cbr(3, 8), _cbr(8, 8), nn.Conv2d(8, 3, 1))
    sites = asr_fx.find_sites(model, example_inputs=(torch.randn(1, 3, 8, 8),), existing=False)
    assert [(s.module, s.rule) for s in sites] == [("0.1", "norm-act"), ("1.1", "norm-act")]


class TinyFPN(nn.Module):
    """A residual backbone with two levels, an FPN-like top-down neck of norm-free convs (1x1 laterals,
    nearest upsampling, adds, 3x3 output convs) and, beside it, an LR-ASPP-like sum of two prediction
    convs that is an output: a prediction, not a neck."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.stage1 = Block(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stage2 = Block(16)
        self.lateral1, self.lateral2 = nn.Conv2d(8, 6, 1), nn.Conv2d(16, 6, 1)
        self.out1, self.out2 = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.logits_low, self.logits_high = nn.Conv2d(8, 2, 1), nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor):
        c1 = self.stage1(self.stem(x))
        c2 = self.stage2(self.down(c1))
        top = self.lateral2(c2)
        merged = self.lateral1(c1) + F.interpolate(top, size=c1.shape[-2:], mode="nearest")
        logits = self.logits_low(c1) + F.interpolate(self.logits_high(c2), size=c1.shape[-2:], mode="nearest")
        return self.out1(merged), self.out2(top), logits


def test_fpn_like_neck_of_norm_free_convs_gets_neck_sites_and_predictions_none():
    torch.manual_seed(0)
    model, x = TinyFPN(), torch.randn(2, 3, 16, 16)
    sites = asr_fx.find_sites(model, example_inputs=(x,), existing=False)
    assert [(s.module, s.rule, s.fold_target) for s in sites] == [
        ("stage1.bn2", "residual", "stage1.bn2"), ("down.1", "norm-act", "down.1"),
        ("stage2.bn2", "residual", "stage2.bn2"), ("lateral2", "neck", "lateral2"),
        ("lateral1", "neck", "lateral1"), ("out1", "neck", "out1"), ("out2", "neck", "out2")]
    assert [s.module for s in asr_fx.find_sites(model, "neck", example_inputs=(x,), existing=False)] == [
        "lateral2", "lateral1", "out1", "out2"]
    inst, fused, vanilla, want, got = _instrument_and_fuse(model, x)
    for w, g in zip(want, got):
        assert rel_err(w, g) <= 1e-5
    assert rel_err(vanilla[0], want[0]) > 1e-3 and rel_err(vanilla[1], want[1]) > 1e-3
    assert asr_fx.fusion_report(fused).unfolded == []


def test_a_branch_sum_before_an_activation_is_not_a_neck():
    """RepVGG/ACNet-style: two norm-free convs summed, then ReLU: the sum reaches no layer linearly."""

    class SumThenReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.a(x) + self.b(x)))

    assert asr_fx.find_sites(SumThenReLU(), "neck", example_inputs=(torch.randn(1, 3, 8, 8),), existing=False) == []


def _retinanet_resnet18_fpn() -> nn.Module:
    """torchvision's RetinaNet on a ResNet-18 FPN (64 channels, P3-P7), random weights, 96 px images."""
    backbone = BackboneWithFPN(torchvision.models.resnet18(), {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [128, 256, 512], 64, extra_blocks=LastLevelP6P7(64, 64))
    return RetinaNet(backbone, num_classes=3, min_size=96, max_size=96, score_thresh=0.0, detections_per_img=5)


def test_torchvision_retinanet_gets_sites_in_backbone_and_fpn_and_fused_boxes_match():
    torch.manual_seed(0)
    model = _retinanet_resnet18_fpn().eval()
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 96, generator=gen), torch.rand(3, 80, 96, generator=gen)]
    inst = asr_fx.instrument(model, example_inputs=(images,))
    by_rule: dict[str, list[str]] = {}
    for s in asr_fx.get_config(inst)["sites"]:
        by_rule.setdefault(s["rule"], []).append(s["module"])
    assert by_rule["residual"] == [f"body.layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)]
    assert by_rule["neck"] == [f"fpn.{kind}_blocks.{i}.0" for i in (2, 1, 0) for kind in ("inner", "layer")]
    assert "fpn.extra_blocks.p6" in by_rule["norm-act"] and not any(m.startswith("body.conv1") or m == "body.bn1"
                                                                   for m in by_rule["norm-act"])
    fuse_detector_checked(model, inst, images, 5, acting="scores")
