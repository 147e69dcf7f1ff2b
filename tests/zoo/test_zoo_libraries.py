"""timm, Hugging Face, ultralytics, torchvision detection and smp models through the whole pipeline
(tools/zoo_sweep.py --zoo ...): instrument -> SGD step -> eval -> fuse(strict=True) -> parameters.

Default: a handful of small models, without ONNX. ``-m slow``: every entry of every zoo, with ONNX.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import fuse_detector_checked
from torch import nn

import asr_fx
from testkit import zoos
from testkit.zoo_run import run_entry

#: (zoo, entry, the module it needs): small and quick; each stands for a capture category
HANDFUL = [
    ("timm", "efficientnet/tinynet_e", "timm"),  # BatchNormAct2d traced through, drop-path
    ("timm", "convnext/convnext_atto", "timm"),  # LayerNorm2d, layer scale
    ("hf", "ResNet", "transformers"),  # return_dict flags, shape check (shape-aware tracing), ModelOutput
    ("smp", "FPN", "segmentation_models_pytorch"),  # input-shape check: parts captured in place
    ("yolo", "yolov8n.yaml", "ultralytics"),  # the head loop: layers and head convs captured in place
]


def _entry(zoo: str, name: str):
    if zoo == "timm":
        return zoos.timm_entry(name.split("/")[1])
    return zoos.ZOOS[zoo]()[name]


@pytest.mark.parametrize(("zoo", "name", "needs"), HANDFUL, ids=[f"{z}-{n}" for z, n, _ in HANDFUL])
def test_zoo_handful(zoo, name, needs):
    pytest.importorskip(needs)
    row = run_entry(name, _entry(zoo, name), onnx=False)
    assert row.ok, row.status
    assert row.sites > 0 and row.fuse_err <= 1e-5 and row.params_ok


def _all_entries():
    out = []
    for zoo in zoos.ZOOS:
        try:
            out += [(zoo, name) for name in zoos.ZOOS[zoo]()]
        except ImportError:
            continue
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("zoo", "name"), _all_entries() if "slow" in " ".join(sys.argv) else [])
def test_zoo_full(zoo, name):
    row = run_entry(name, zoos.ZOOS[zoo]()[name])
    assert row.ok or row.status.startswith("skipped"), row.status


def test_torchvision_detector_fused_boxes_scores_and_labels_match_the_instrumented_ones():
    """Faster R-CNN as torchvision builds it (eval, score threshold 0 so random weights detect something):
    sites in the backbone, and the fused detector returns the instrumented one's boxes, scores and labels."""
    import torch
    import torchvision

    import asr_fx

    torch.manual_seed(0)
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None, num_classes=3, box_score_thresh=0.0,
                                         box_detections_per_img=5).eval()
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 96, generator=gen), torch.rand(3, 80, 96, generator=gen)]
    inst = asr_fx.instrument(model, example_inputs=(images,))
    sites = asr_fx.get_config(inst)["sites"]
    assert sum(s["node"].startswith("backbone/") for s in sites) >= 10
    fuse_detector_checked(model, inst, images, 5, acting="boxes", seed=3, scale=0.3)


def test_a_sweep_row_fails_when_a_pass_changed_the_users_model(monkeypatch):
    """The model-kept check of every zoo row can fail: an instrument that nudges one weight of the model it was
    given (and even raises afterwards) marks the row CHANGED."""
    def nudging_instrument(model, **kwargs):
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
        raise asr_fx.ASRError("refused after touching the model")

    monkeypatch.setattr(asr_fx, "instrument", nudging_instrument)
    entry = zoos.Entry(build=lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), size=16)
    row = run_entry("nudged", entry, onnx=False)
    assert row.kept == "state_dict entry '0.weight' changed"
    assert row.status.startswith("CHANGED the user's model: state_dict entry '0.weight' changed; error in instrument")


def test_wav2vec2_encoder_layers_handed_flags_through_kwargs_take_sites():
    """transformers 5 hands each encoder layer ``output_hidden_states=`` through ``**kwargs``, and the encoder's
    LayerDrop does not trace in train mode: the layers are captured one by one, in their own class."""
    pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    entry = zoos.ZOOS["hf"]()["Wav2Vec2"]
    model, x = entry.build().eval(), entry.inputs(2, 1)
    instrumented = asr_fx.instrument(model, example_inputs=x)
    modules = {s["module"] for s in asr_fx.get_config(instrumented)["sites"]}
    assert {"attention.out_proj", "feed_forward.output_dense"} <= modules, modules
    assert type(instrumented.wav2vec2.encoder.layers[0]).__name__ == "Wav2Vec2EncoderLayer"
    instrumented.eval()
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(fused(*x).logits, instrumented(*x).logits, rtol=1e-5, atol=1e-6)
