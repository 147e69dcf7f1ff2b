"""Equivalence checks for your own CI with asr_fx.testing: a pytest file to copy into your project.

    python -m pytest -q examples/ci_equivalence.py     # as pytest runs it in your CI
    python examples/ci_equivalence.py                  # the same checks as a script

Each test fails with an AssertionError that says which check failed and by how much.
"""

import torch

import asr_fx
from asr_fx.models import cifar_resnet
from asr_fx.testing import assert_fusion_equivalent


def trained_asr_model(vanilla: torch.nn.Module) -> torch.nn.Module:
    """Stands in for your trained checkpoint: an instrumented model with psi and F moved off their start."""
    model = asr_fx.instrument(vanilla, attention="se")
    with torch.no_grad():
        for p in asr_fx.asr_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# --8<-- [start:ci]
def test_trained_asr_model_fuses_to_the_vanilla_cost():
    vanilla = cifar_resnet(depth=11).eval()  # your model class, freshly built
    model = trained_asr_model(vanilla)       # in your CI: instrument, then load_state_dict(your checkpoint)
    # every site folds, outputs agree to 1e-5 * max|out|, the vanilla parameter count,
    # and onnxruntime agrees with the vanilla model's ONNX op multiset
    assert_fusion_equivalent(model, torch.randn(2, 3, 32, 32), vanilla=vanilla, onnx=True)
# --8<-- [end:ci]


if __name__ == "__main__":
    test_trained_asr_model_fuses_to_the_vanilla_cost()
    print("all checks passed")
