"""instrument and find_sites leave the user's model exactly as it was: hooks of every kind, flags, attributes
and output, also for a forward that registers hooks on its first call, and also when instrument raises."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import asr_fx


def _hook_counts(model: nn.Module) -> dict[str, int]:
    return {f"{name}.{key}": len(value) for name, m in model.named_modules() for key, value in vars(m).items()
            if "hooks" in key and isinstance(value, dict)}


def _global_hook_count() -> int:
    from torch.nn.modules import module as module_file
    return sum(len(v) for k, v in vars(module_file).items() if k.startswith("_global_") and "hooks" in k
               and isinstance(v, dict))


class _CapturingNet(nn.Module):
    """Collects its stages' outputs with forward hooks it installs on the first call, guarded by a flag
    (as transformers' output capture does), and sums them: each extra set of hooks changes the output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                    for _ in range(3))
        self.head = nn.Conv2d(8, 4, 1)

    def _install(self) -> None:
        for stage in self.stages:
            stage.register_forward_hook(lambda m, _a, out: m.collected.append(out))
            stage.register_forward_pre_hook(lambda _m, args: None)
            stage.register_full_backward_hook(lambda _m, gin, gout: None)
        self.register_state_dict_post_hook(lambda *a: None)
        self._hooks_installed = True

    def forward(self, x):
        if not getattr(self, "_hooks_installed", False):
            self._install()
        x = self.stem(x)
        for stage in self.stages:
            stage.collected = []
            x = stage(x)
        return self.head(sum(out for stage in self.stages for out in stage.collected))


class _GloballyHookedNet(_CapturingNet):
    """Registers a global module forward hook on its first call, kept by a handle on the model."""

    def forward(self, x):
        if not hasattr(self, "_global_handle"):
            self._global_handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
        return super().forward(x)


def _assert_unchanged(model: nn.Module, twin: nn.Module, x: torch.Tensor, hooks: dict[str, int], globals_: int,
                      attributes: dict[str, set[str]]) -> None:
    assert _hook_counts(model) == hooks
    assert _global_hook_count() == globals_
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attributes
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
    assert _hook_counts(model) == _hook_counts(twin)  # one set each after a call, not one per trace


@pytest.mark.parametrize("make", [_CapturingNet, _GloballyHookedNet])
@pytest.mark.parametrize("action", ["instrument", "find_sites", "instrument-raises", "instrument-no-inputs"])
def test_capture_leaves_a_self_hooking_model_as_it_was(make, action):
    torch.manual_seed(0)
    model = make().eval()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    before = (_hook_counts(model), _global_hook_count(), {n: set(vars(m)) for n, m in model.named_modules()})
    if action == "instrument":
        asr_fx.instrument(model, example_inputs=(x,))
    elif action == "instrument-no-inputs":
        asr_fx.instrument(model)
    elif action == "find_sites":
        asr_fx.find_sites(model, example_inputs=(x,))
    else:
        with pytest.raises(asr_fx.ASRError):
            asr_fx.instrument(model, example_inputs=(x,), sites=["no_such_layer"])
    _assert_unchanged(model, twin, x, *before)


def test_a_trace_of_a_self_hooking_model_keeps_its_hooks_flag_and_output():
    torch.manual_seed(0)
    model = _CapturingNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)  # the first call installs the hooks and sets the flag
    hooks = _hook_counts(model)
    for _ in range(3):
        asr_fx.instrument(model, example_inputs=(x,))
    assert model._hooks_installed and _hook_counts(model) == hooks
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def _tiny_dpt():
    transformers = pytest.importorskip("transformers")
    config = transformers.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, neck_hidden_sizes=[8, 16, 32, 32],
                                    fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3], head_hidden_size=8)
    return transformers.DPTForDepthEstimation(config)


def test_capture_leaves_a_transformers_model_with_output_capture_hooks_as_it_was():
    torch.manual_seed(0)
    model = _tiny_dpt().eval()
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    hooks = _hook_counts(model)
    asr_fx.find_sites(model, example_inputs=(x,))
    instrumented = asr_fx.instrument(model, example_inputs=(x,))
    assert len(instrumented.asr) > 0
    assert _hook_counts(model) == hooks
    with torch.no_grad():
        got, want = model(x).predicted_depth, twin(x).predicted_depth
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert _hook_counts(model) == _hook_counts(twin)
    with torch.no_grad():  # and the instrumented model at v = 1 computes it too (all four neck inputs, not one)
        for block in instrumented.asr.modules():
            if isinstance(block, asr_fx.ASR):
                block.attention_value = lambda b=block: torch.ones(b.broadcast_shape)
        out = instrumented(x)
        out = out.predicted_depth if hasattr(out, "predicted_depth") else out[0]
    assert ((out - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.parametrize("parametrization", [nn.utils.parametrizations.spectral_norm,
                                             nn.utils.parametrizations.weight_norm])
def test_fuse_without_inputs_leaves_a_parametrized_model_in_train_mode_as_it_was(parametrization):
    """Choosing the probe's dtype reads the first layer's raw weight (``original``, or weight_norm's
    ``original0``), never ``.weight``: that runs the parametrization, and spectral_norm's power iteration
    writes its ``_u`` buffer in train mode."""
    torch.manual_seed(0)
    model = nn.Sequential(parametrization(nn.Conv2d(3, 4, 1)), nn.BatchNorm2d(4), nn.ReLU()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asr_fx.fuse(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training
