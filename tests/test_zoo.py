"""The torchvision zoo through the whole pipeline (tools/zoo_sweep.py).

Default: a representative subset, one model per family, with the quick check (fuse error,
parameters and op multiset in torch.fx against fuse(vanilla)) and the full ONNX + onnxruntime
check on resnet18 (mobilenet_v3_small: in test_placement). ``-m slow``: every classification model, full check.
"""

from __future__ import annotations

import pytest
import torchvision

from testkit import torchvision_zoo

#: one model per family; the paper's rule auto should choose for each
SUBSET = {
    "resnet18": "residual", "vgg11_bn": "norm-act", "mobilenet_v2": "norm-act", "mobilenet_v3_small": "norm-act",
    "shufflenet_v2_x0_5": "branch", "efficientnet_b0": "norm-act", "regnet_y_400mf": "residual",
    "convnext_tiny": "residual", "vit_b_16": "transformer", "swin_t": "transformer", "densenet121": "norm-act",
}
WITH_ONNX = {"resnet18"}  # mobilenet_v3_small goes through ONNX in test_placement; all of them in -m slow


@pytest.mark.parametrize("name", sorted(SUBSET))
def test_zoo_subset(name):
    row = torchvision_zoo.sweep_model(name, onnx=name in WITH_ONNX)
    assert row.status == "ok", row.status + "".join(row.notes)
    assert row.rules == f"{SUBSET[name]} {row.sites}"
    assert row.fuse_err <= 1e-5 and row.params_fused == row.params_reference and row.ops_equal
    if name in WITH_ONNX:
        assert row.ort_err <= 1e-4


def test_vanilla_reference_is_the_vanilla_model_without_own_constant_multiplies():
    row = torchvision_zoo.sweep_model("mobilenet_v3_small", onnx=False)
    assert row.params_reference == row.params_vanilla


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_zoo_full(name):
    row = torchvision_zoo.sweep_model(name)
    assert row.ok or row.status.startswith("skipped"), row.status
