"""The pass contract and the declared pipelines: one runner that lints after each pass and names the
failing one; immutable fold records (a later pass adds its own); one registry of placement rules;
passes/ importing nothing above it; the architecture page's pipeline listing (docs/architecture.md) equal to the
declared lists, and its module lists naming every module file once."""

from __future__ import annotations

import ast
import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from conftest import FUSE_RTOL, rel_err
from torch import nn

import asr_fx
from asr_fx.api import RULES
from asr_fx.passes import FUSE_PIPELINE, PassResult, Pipeline, Site, trace
from asr_fx.passes.fold.fold import fold_scales
from asr_fx.passes.fold.propagate import propagate_scales
from asr_fx.passes.pipelines import INSTRUMENT_PIPELINE
from asr_fx.passes.placement.rules import PLACEMENT_RULES, RULE_ALIASES, placement_rule

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"  # the docs site's "How the code is laid out" page


def test_architecture_page_lists_the_declared_pipelines():
    section = ARCHITECTURE.read_text()
    listed = dict(re.findall(r"^(instrument|fuse): (.+)$", section, flags=re.M))
    assert listed["instrument"].split(" -> ") == INSTRUMENT_PIPELINE.pass_names()
    assert listed["fuse"].split(" -> ") == FUSE_PIPELINE.pass_names()


def _architecture_module_lists() -> dict[str, list[str]]:
    """The architecture page's lists: folder -> the module names of its lines, in order.
    A list starts at a line naming its folder in backticks and ending with a colon."""
    section = ARCHITECTURE.read_text()
    lists: dict[str, list[str]] = {}
    folder = None
    for line in section.splitlines():
        heading = re.search(r"\(`((?:asr_fx|passes)[\w/]*/)`.*\):$", line)
        if heading:
            folder = heading.group(1)
            lists[folder] = []
        elif folder and line.startswith("- `"):
            lists[folder].append(re.match(r"- `([\w.]+\.py)`", line).group(1))
    return lists


def test_architecture_page_lists_every_module_once():
    lists = _architecture_module_lists()
    folders = sorted({str(p.parent.relative_to(ROOT)) + "/" for base in ("asr_fx", "passes")
                      for p in (ROOT / base).rglob("*.py")})
    assert sorted(lists) == folders
    for folder, listed in lists.items():
        on_disk = sorted(p.name for p in (ROOT / folder).glob("*.py"))
        assert sorted(listed) == on_disk, folder
        assert len(listed) == len(set(listed)), folder


def _small() -> fx.GraphModule:
    return trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))


def test_runner_names_the_failing_pass_and_keeps_the_error():
    def fine(module, context):
        return PassResult(module, False, ("made",))

    def broken(module, context):
        raise ValueError("boom")

    with pytest.raises(ValueError) as info:
        Pipeline("demo", (fine, broken)).run(_small())
    assert str(info.value) == "boom"
    assert "asr-fx: raised in pass `broken` of the `demo` pipeline" in info.value.__notes__


def test_runner_lints_the_graph_after_each_pass():
    def corrupt(gm, context):
        relu = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "2")
        relu.args = (relu,)  # a node reading itself: not a valid graph
        return PassResult(gm, True)

    with pytest.raises(Exception) as info:
        Pipeline("demo", (corrupt,)).run(_small())
    assert any("`corrupt`" in note for note in info.value.__notes__)


def test_runner_returns_every_record_in_order():
    def one(module, context):
        return PassResult(module, False, (1,))

    def two(module, context):
        assert context.records == [1]
        return PassResult(module, True, (2, 3))

    gm, records = Pipeline("demo", (one, two)).run(_small())
    assert isinstance(gm, fx.GraphModule) and records == [1, 2, 3]


class _ReluThenScale(nn.Module):
    """A scale after a ReLU of the input: no producer takes it, the conv after it does."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(1, 3, 1, 1) + 0.5)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(torch.relu(x) * self.scale)


def test_fold_records_are_immutable_and_propagation_adds_its_own():
    model = _ReluThenScale().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = trace(copy.deepcopy(model))  # the passes change the modules of the graph they get
    folded = fold_scales(gm)
    (left,) = folded.records
    assert not left.folded and left.reason
    with pytest.raises(dataclasses.FrozenInstanceError):
        left.reason = "edited"  # type: ignore[misc]
    pushed = propagate_scales(gm, list(folded.records))
    (moved,) = pushed.records
    assert left.where == "left as Mul" and moved.mul == left.mul and moved.where == "next-conv"
    assert moved.reason == f"pushed forward ({left.reason})"
    assert rel_err(model(x), gm(x)) < FUSE_RTOL
    report = asr_fx.FusionReport.from_pass_records([*folded.records, *pushed.records])
    assert report.records == [moved]


def test_one_registry_of_placement_rules():
    assert list(RULES) == list(PLACEMENT_RULES) == ["auto", "residual", "norm-act", "branch", "transformer", "neck"]
    for alias, name in RULE_ALIASES.items():
        assert placement_rule(alias) is PLACEMENT_RULES[name]
    assert all(rule.looks_for for rule in PLACEMENT_RULES.values())
    assert placement_rule("no-such-rule") is None
    with pytest.raises(asr_fx.errors.InvalidOptionError, match="unknown rule 'nope'; choose one of"):
        asr_fx.instrument(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), rule="nope")


def test_site_dicts_round_trip_and_old_ones_load():
    site = Site("bn", "bn", "norm-act", 4, -3, "bn")
    assert Site.from_dict(site.to_dict()) == site
    assert Site.from_dict({**site.to_dict(), "key": "bn"}) == site  # an old dict with the removed key
    assert not hasattr(site, "key")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_passes_import_nothing_of_the_library_but_its_errors():
    for path in sorted((ROOT / "passes").glob("*.py")):
        above = [m for m in _imports(path) if m.startswith("asr_fx") and m != "asr_fx.errors"]
        assert not above, f"{path.name} imports {above}"
