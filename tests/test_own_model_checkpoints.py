"""Checkpoints of the own-model form, and checkpoints saved from the graph form (asr-fx before the module
form: a GraphModule's state_dict, a config without ``form``) loading into it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturb_asr
from torch import nn

import asr_fx
from asr_fx.checkpoint import FORMAT, VERSION, atomic_torch_save
from asr_fx.own_model import graph_form, remove

FACTORY = "test_own_model_checkpoints:with_unused"
X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))


class WithUnused(nn.Module):
    """A model with a module its forward never calls (a graph form's state_dict does not hold it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.spare_head = nn.Linear(8, 3)  # never called
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.relu(y + self.bn2(self.conv2(y)))
        return self.head(y.mean((2, 3)))


def with_unused() -> WithUnused:
    torch.manual_seed(0)
    return WithUnused()


def _instrumented() -> nn.Module:
    model = asr_fx.instrument(asr_fx.build(FACTORY), example_inputs=(X,))
    perturb_asr(model)
    return model.eval()


def test_save_and_load_keep_the_users_class(tmp_path):
    model = _instrumented()
    asr_fx.save(model, tmp_path / "m.pt")
    loaded = asr_fx.load(tmp_path / "m.pt")
    assert type(loaded) is WithUnused and asr_fx.asr_config(loaded).form == "module"
    assert list(loaded.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


@pytest.mark.parametrize("norm_fused", [True, False, None])
def test_a_checkpoint_saved_from_the_graph_form_loads_into_the_module_form(tmp_path, norm_fused):
    model = _instrumented()
    vanilla = copy.deepcopy(model)
    blocks = remove(vanilla)
    old = graph_form(vanilla, blocks, None, (X,))  # the graph form, as instrument returned it before
    state = old.state_dict()
    assert not any(k.startswith("spare_head.") for k in state)  # its keys: the called modules only
    config = {k: v for k, v in asr_fx.get_config(model).items()
              if k not in ("form", "graph_reason", "factory", "bn_affine_form")}
    config["version"] = 1  # the config of asr-fx before the module form: the option was called norm_fused
    if norm_fused is None:  # a version-0 config: written before norm_fused existed
        config = {k: v for k, v in config.items() if k != "version"}
    else:
        config["norm_fused"] = norm_fused
    atomic_torch_save({"format": FORMAT, "version": VERSION, "factory": FACTORY, "factory_kwargs": {},
                       "asr": config, "input_shape": list(X.shape), "state_dict": state}, tmp_path / "old.pt")
    loaded = asr_fx.load(tmp_path / "old.pt")
    assert type(loaded) is WithUnused
    with torch.no_grad():
        assert torch.allclose(loaded(X), old.eval()(X), rtol=1e-5, atol=1e-6)
        assert torch.allclose(loaded(X), model(X), rtol=1e-5, atol=1e-6)
    fused = asr_fx.fuse(loaded)
    assert type(fused) is WithUnused and list(fused.state_dict()) == list(vanilla.state_dict())
