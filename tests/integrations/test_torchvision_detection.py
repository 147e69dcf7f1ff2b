"""torchvision detection: an instrumented Faster R-CNN stays the user's ``FasterRCNN``; in training mode it
takes ``targets`` and returns torchvision's loss dict, trains a step, and after it the fused ``FasterRCNN``
returns the instrumented one's detections (boxes, scores, labels).

fasterrcnn_mobilenet_v3_large_320_fpn from torchvision's builder (weights=None, weights_backbone=None, so
plain BatchNorm), images resized to 64..96 px; score threshold 0 so random weights detect something."""

from __future__ import annotations

import torch
import torchvision
from conftest import (
    asr_values,
    assert_asr_trained,
    assert_own_model,
    assert_same_detections,
    assert_vanilla_form,
    perturb_asr,
    without_asr,
)

import asr_fx

COUNT = 5


def _vanilla() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None,
                                        num_classes=3, min_size=64, max_size=96, box_score_thresh=0.0,
                                        box_detections_per_img=COUNT)


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 96, 96, generator=g), torch.rand(3, 80, 96, generator=g)]


def _targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 5.0, 90.0, 40.0]]),
             "labels": torch.tensor([1, 2])},
            {"boxes": torch.tensor([[5.0, 5.0, 50.0, 60.0]]), "labels": torch.tensor([2])}]


def test_faster_rcnn_trains_with_targets_then_fuses_to_the_same_detections():
    vanilla = _vanilla().eval()
    images = _images()
    model = asr_fx.instrument(vanilla, example_inputs=(images,))
    assert_own_model(model, vanilla)
    before = asr_values(model)

    model.train()
    losses = model(images, _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sum(losses.values()).backward()
    psi = {n: p.grad for n, p in model.named_parameters() if n.endswith("psi")}
    assert psi and all(g is not None for g in psi.values())
    optimizer.step()
    assert_asr_trained(before, model, share=0.9)  # a site or two behind a ReLU that is dead on these images

    perturb_asr(model, seed=3, scale=0.3)  # v as far from its start as a longer training would take it
    model.eval()
    with torch.no_grad():
        want = model(images)
        plain = without_asr(model, vanilla).eval()(images)
        assert any(not torch.equal(p["boxes"], w["boxes"]) for p, w in zip(plain, want))  # the blocks act
        fused = asr_fx.fuse(model, strict=True, example_inputs=(images,))
        assert_vanilla_form(fused, vanilla)
        assert_same_detections(fused(images), want, COUNT)
