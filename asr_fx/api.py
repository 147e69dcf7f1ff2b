"""The library's entry points: ``instrument`` / ``find_sites`` (:mod:`asr_fx.instrument_model`) and
``fuse`` / ``fusion_report`` / ``asr_parameters`` (here), like ``prepare_fx`` / ``convert_fx``.

``fuse`` runs :data:`asr_fx.passes.pipelines.FUSE_PIPELINE`, a declared list of passes, on a private
eval-mode copy of the model, and attaches a :class:`~asr_fx.fusion.FusionReport` to the result.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asr_fx.config import get_config, set_config
from asr_fx.equivalence import check_fused
from asr_fx.errors import FusionError
from asr_fx.fusion import FUSION_KEY, FusionReport, fusion_report
from asr_fx.instrument_model import find_sites, instrument
from asr_fx.into_vanilla import fuse_into
from asr_fx.partial_capture import fuse_parts, is_partial
from asr_fx.passes.capture.shapes import as_input_tuple
from asr_fx.passes.fold.fold_targets import folding_in_place
from asr_fx.passes.forms.asr_blocks import ASR
from asr_fx.passes.pipelines import fuse_pipeline
from asr_fx.passes.placement.rules import PLACEMENT_RULES, RULE_ALIASES

#: placement rules by name (a view of :data:`asr_fx.passes.placement.rules.PLACEMENT_RULES`)
RULES = {name: rule.find for name, rule in PLACEMENT_RULES.items()}

def fuse(
    model: nn.Module,
    strict: bool = False,
    *,
    fold_bn: bool = False,
    example_inputs: Sequence[torch.Tensor] | None = None,
    leaf_modules: Any = None,
    into: nn.Module | None = None,
    check: bool = True,
) -> fx.GraphModule | nn.Module:
    """Fold every constant per-channel scale (every ASR block) into its layer; returns a new GraphModule.

    ``model`` is not modified. The result is in eval mode and computes what ``model.eval()``
    computes. Every constant per-channel ``mul`` (ASR blocks, layer scales) folds into the layer
    before it, or is pushed forward through ReLU/pooling/flatten into the next conv/linear/BN
    (``example_inputs`` give the shapes that reshapes and rank-dependent norms need). Sites that
    could not be folded stay as one constant ``mul`` and are reported with a
    warning (``asr_fx.fusion_report(fused)`` has the details); ``strict=True`` raises
    :class:`asr_fx.FusionError` instead. ``fold_bn=True`` also folds BatchNorm into the conv before it.

    ``into=vanilla``: write the folded weights into ``vanilla`` (a freshly built model of the vanilla
    class), check it computes what the fused graph computes and return ``vanilla`` itself
    (:func:`asr_fx.into_vanilla.fuse_into`; :class:`asr_fx.VanillaModelError` names what refuses). For a
    model instrumented part by part, each fused part goes into the matching submodule of ``vanilla`` and
    every other tensor of ``model`` with it.

    ``check`` (default): the result is checked against ``model`` in eval mode on ``example_inputs`` (or the
    input shape ``instrument`` recorded) and :class:`asr_fx.EquivalenceError` names the first layer that
    differs; ``False`` skips it. A model instrumented part by part (:mod:`asr_fx.partial_capture`) is fused
    part by part, in place in a copy of the model's own class.
    """
    if is_partial(model):
        inputs = as_input_tuple(example_inputs)
        fused = fuse_parts(model, fuse, strict=strict, fold_bn=fold_bn, example_inputs=inputs, check=check)
        if into is None:
            return fused
        return fuse_into(fused, into, model, example_inputs=inputs, leaf_modules=leaf_modules)
    work = copy.deepcopy(model).eval()  # the one copy: folds then write into its tensors, which no one else holds
    with folding_in_place():
        gm, records = fuse_pipeline(work, fold_bn=fold_bn, example_inputs=example_inputs, leaf_modules=leaf_modules)
    blocks = tuple(name for name, m in model.named_modules() if isinstance(m, ASR))
    report = FusionReport.from_pass_records(records, blocks)
    gm.meta[FUSION_KEY] = report
    if report.unfolded:
        message = report.unfolded_message()
        if strict:
            raise FusionError(message, report)
        warnings.warn(message, stacklevel=2)
    if check:
        check_fused(model, gm.eval(), example_inputs)
    if into is not None:
        return fuse_into(gm.eval(), into, model, example_inputs=as_input_tuple(example_inputs),
                         leaf_modules=leaf_modules)
    return gm.eval()


def asr_parameters(model: nn.Module) -> list[nn.Parameter]:
    """psi and the attention networks' parameters of every ASR block (they train with everything else in the
    authors' recipe, weight decay included; a separate optimizer group is for experiments)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, ASR):
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


__all__ = ["RULES", "RULE_ALIASES", "asr_parameters", "find_sites", "fuse", "fusion_report",
           "get_config", "instrument", "set_config"]
