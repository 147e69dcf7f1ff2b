"""The layer registry: one ordered list of rules that placement and fold both ask; every rule has its
own test file beside this one; a node placement offers a site after is one the fold has a target or a
stated refusal for."""

import importlib
from pathlib import Path

import pytest
import torch
from layer_rule_checks import last_node, traced
from torch import nn

from asr_fx.passes.layers import registry
from asr_fx.passes.layers.base import LayerMatch, LayerRule, NoMatch, Refusal, Target, TensorUsage
from asr_fx.passes.placement.locate import site_at

HERE = Path(__file__).parent
RULE_FILES = Path(registry.__file__).parent


def test_every_registered_rule_has_its_own_file_and_test():
    for rule in registry.LAYER_RULES:
        module = type(rule).__module__.rsplit(".", 1)[1]
        assert (RULE_FILES / f"{module}.py").exists(), rule
        assert (HERE / f"test_{module}.py").exists(), f"{rule} has no tests/passes/layers/test_{module}.py"
    names = [r.name for r in registry.LAYER_RULES]
    assert len(names) == len(set(names))


def test_every_rule_defined_in_the_folder_is_registered():
    for path in RULE_FILES.glob("*.py"):
        module = importlib.import_module(f"asr_fx.passes.layers.{path.stem}")
        for value in vars(module).values():
            if isinstance(value, LayerRule) and type(value).__module__ == module.__name__:
                assert value in registry.LAYER_RULES, f"{value} is defined in {path.name} but not registered"


@pytest.mark.parametrize("model, x", [
    (nn.Conv2d(3, 4, 3), torch.randn(1, 3, 5, 5)),
    (nn.BatchNorm1d(3), torch.randn(2, 3, 4)),
    (nn.LayerNorm(4), torch.randn(2, 4)),
    (nn.Linear(3, 4), torch.randn(2, 3)),
])
def test_placement_and_fold_read_the_same_layer(model, x):
    gm = traced(model, x)
    node = last_node(gm)
    layer = registry.layer_at(gm, node)
    target = registry.output_target(gm, node)
    site = site_at(gm, node, "explicit")
    assert isinstance(layer, LayerMatch) and isinstance(target, Target)
    assert (site.channels, site.channel_pos, site.fold_target) == (target.channels, target.position, target.label)


def test_no_layer_is_a_no_match_with_its_reason():
    gm = traced(nn.ReLU(), torch.randn(2, 3))
    node = last_node(gm)
    assert registry.layer_at(gm, node) is None
    for answer in (registry.recognise(gm, node), registry.output_target(gm, node), registry.input_target(gm, node)):
        assert isinstance(answer, NoMatch) and node.name in answer.reason


def test_a_layer_called_twice_is_refused_as_shared():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    gm = traced(Twice(), torch.randn(1, 3, 4, 4))
    refused = registry.shared_layer_refusal(gm, last_node(gm), TensorUsage(gm))
    assert isinstance(refused, Refusal) and "called at 2 places" in refused.reason
