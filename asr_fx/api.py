"""The library's entry points: ``instrument`` / ``find_sites`` (:mod:`asr_fx.instrument_model`) and
``fuse`` / ``fusion_report`` / ``asr_parameters`` (here), like ``prepare_fx`` / ``convert_fx``.

``fuse`` runs :data:`asr_fx.passes.pipelines.FUSE_PIPELINE`, a declared list of passes, on a private
eval-mode copy of the model, and attaches a :class:`~asr_fx.fusion.FusionReport` to the result.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asr_fx._util import copy_of
from asr_fx.config import get_config, set_config
from asr_fx.equivalence import (
    check_fused,
    derive_probe,
    expected_outputs,
    fused_probe,
    probe_inputs,
    run_on_copies,
    saved_state,
)
from asr_fx.errors import ASRError, FusionError, VanillaModelError
from asr_fx.fusion import FUSION_KEY, FusionReport, fusion_report
from asr_fx.instrument_model import find_sites, instrument
from asr_fx.into_vanilla import fuse_into
from asr_fx.leaf_spec import recorded_leaves
from asr_fx.own_model import LEAVES, graph_form, is_module_form, remove, tree_copy, unattached_blocks
from asr_fx.partial_capture import fuse_parts, is_partial
from asr_fx.passes.capture.shapes import as_input_tuple
from asr_fx.passes.forms.asr_blocks import ASR
from asr_fx.passes.forms.output_form import carries_block, traced_output_forms
from asr_fx.passes.layers.base import folding_in_place
from asr_fx.passes.pipelines import FuseOptions, fuse_pipeline
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
    inplace: bool = False,
) -> fx.GraphModule | nn.Module:
    """Fold every constant per-channel scale (every ASR block) into its layer; returns the user's own model.

    For a model :func:`asr_fx.instrument` returned in the module form (the user's class with blocks
    attached), the result is that class again, with the folded weights in the vanilla architecture: no
    ASR submodules, no hooks, the vanilla state_dict keys (:mod:`asr_fx.own_model`). Where a fold has no
    place in that class (a scale left as a ``mul``, ``fold_bn=True``, a norm without affine that gained
    one), the fused GraphModule is returned with a warning saying why. A model in the graph form (a
    GraphModule) gives a GraphModule, as before.

    ``model`` is not modified, unless ``inplace=True``: then the folded weights go into ``model`` itself
    (hooks and ``asr`` removed) and it is returned; that refuses where the result would be a GraphModule.
    The result is in eval mode and computes what ``model.eval()``
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

    ``leaf_modules``: as for :func:`asr_fx.instrument`; by default the ones ``instrument`` recorded.

    ``check`` (default): the result is checked against ``model`` in eval mode on ``example_inputs`` (or the
    input shape ``instrument`` recorded) and :class:`asr_fx.EquivalenceError` names the first layer that
    differs; ``False`` skips it. A model instrumented part by part (:mod:`asr_fx.partial_capture`) is fused
    part by part, in place in a copy of the model's own class.
    """
    given = {"leaf_modules": leaf_modules} if leaf_modules is not None else {}  # else each part's recorded ones
    if leaf_modules is None:  # the ones instrument was given
        leaf_modules = recorded_leaves(model)
    if is_partial(model):
        inputs = as_input_tuple(example_inputs)
        fused = fuse_parts(model, fuse, strict=strict, fold_bn=fold_bn, example_inputs=inputs, check=check, **given)
        if into is not None:
            return fuse_into(fused, into, model, example_inputs=inputs, leaf_modules=leaf_modules)
        return _in_place(model, fused) if inplace else fused
    if isinstance(model, fx.GraphModule) and any(carries_block(m) for m in model.modules()):
        work = copy_of(model)  # torch.fx traced an instrumented model: its graph holds the blocks (or it raises)
        if traced_output_forms(work):
            return fuse(work, strict=strict, fold_bn=fold_bn, example_inputs=example_inputs, leaf_modules=leaf_modules,
                        into=into, check=check, inplace=inplace)
    if is_module_form(model):
        return _fuse_module_form(model, strict, fold_bn, as_input_tuple(example_inputs), leaf_modules, into, check,
                                 inplace)
    if inplace:
        raise ASRError("fuse(..., inplace=True) needs a model instrument() returned in the module form (the user's "
                       f"own class); {type(model).__name__} is a GraphModule: leave inplace off")
    work = copy_of(model).eval()  # the one copy: folds then write into its tensors, which no one else holds
    with folding_in_place():
        gm, records = fuse_pipeline(work, FuseOptions(fold_bn, as_input_tuple(example_inputs), leaf_modules))
    _report(model, gm, records, strict)
    if check:
        check_fused(model, gm.eval(), example_inputs)
    if into is not None:
        return fuse_into(gm.eval(), into, model, example_inputs=as_input_tuple(example_inputs),
                         leaf_modules=leaf_modules)
    return gm.eval()


def _report(model: nn.Module, gm: fx.GraphModule, records: list[Any], strict: bool) -> FusionReport:
    """The fusion report of ``records``, on ``gm.meta``; warns (``strict``: raises) about unfolded sites."""
    blocks = tuple(name for name, m in model.named_modules() if isinstance(m, ASR))
    report = FusionReport.from_pass_records(records, blocks)
    gm.meta[FUSION_KEY] = report
    if report.unfolded:
        message = report.unfolded_message()
        if strict:
            raise FusionError(message, report)
        warnings.warn(message, stacklevel=3)
    return report


def _fuse_module_form(model: nn.Module, strict: bool, fold_bn: bool, inputs: tuple[Any, ...] | None,
                      leaf_modules: Any, into: nn.Module | None, check: bool, inplace: bool) -> nn.Module:
    """:func:`fuse` of a model in the module form (see :mod:`asr_fx.own_model`)."""
    loose = unattached_blocks(model)
    if loose:
        raise ASRError(f"the ASR blocks {['asr.' + k for k in loose[:5]]} are attached to no module of "
                       f"{type(model).__name__}: a module was replaced after instrument (convert_sync_batchnorm, "
                       "a new head?), so those blocks took no part in training. Replace modules before instrument")
    leaves = leaf_modules if leaf_modules is not None else model.__dict__.get(LEAVES)
    inputs = probe_inputs(model, inputs)
    if inplace and into is None:
        return _fuse_in_place(model, strict, fold_bn, inputs, leaves, check)
    vanilla, gm, records = _folded_copy(model, fold_bn, inputs, leaves, in_place=True)
    report = _report(model, gm, records, strict)
    if check:
        check_fused(model, gm.eval(), inputs)
    if into is not None:
        return fuse_into(gm.eval(), into, model, example_inputs=inputs, leaf_modules=leaves)
    probe = inputs if inputs is not None else _runs_on(vanilla, derive_probe(vanilla))
    if fold_bn and not inplace:  # BatchNorm folded into convs: the deploy graph, which the class has no place for
        return gm.eval()
    try:  # vanilla is private (dropped on refusal): no backup of its state
        result = fuse_into(gm.eval(), vanilla, model, example_inputs=probe, leaf_modules=leaves, keep_on_refusal=False)
    except VanillaModelError as exc:
        if inplace:
            raise
        warnings.warn(f"fuse returns a GraphModule, not a {type(model).__name__}: {exc}", stacklevel=3)
        # the refused load may have written into vanilla, whose tensors gm shares: fold a fresh copy for gm
        del vanilla, gm
        _, gm, _ = _folded_copy(model, fold_bn, inputs, leaves, in_place=False)
        gm.meta[FUSION_KEY] = report
        return gm.eval()
    result.__dict__[FUSION_KEY] = report
    return _in_place(model, result) if inplace else result


def _folded_copy(model: nn.Module, fold_bn: bool, inputs: tuple[Any, ...] | None, leaves: Any, in_place: bool
                 ) -> tuple[nn.Module, fx.GraphModule, list[Any]]:
    """``(vanilla, gm, records)``: ``vanilla`` a stripped copy of ``model`` (the one whole copy), ``gm`` the fuse
    pipeline's result on a tree copy of it (:func:`graph_form`); ``in_place``: the folds write into ``vanilla``'s
    tensors (no second copy of a folded layer; ``gm`` and ``vanilla`` then share them), else make new ones."""
    vanilla = copy_of(model).eval()
    blocks = remove(vanilla)
    with folding_in_place() if in_place else contextlib.nullcontext():
        gm, records = fuse_pipeline(graph_form(vanilla, blocks, leaves, inputs), FuseOptions(fold_bn, inputs, leaves))
    return vanilla, gm, records


def _fuse_in_place(model: nn.Module, strict: bool, fold_bn: bool, inputs: tuple[Any, ...] | None, leaves: Any,
                   check: bool) -> nn.Module:
    """``fuse(model, inplace=True)`` of the module form without a copy: the folds write into ``model``'s own
    tensors (traced through a stripped tree copy that shares them), checked against ``model``'s eval outputs
    recorded before; the old values of every tensor written wait in a temporary file and are put back if
    anything refuses, so a refusal leaves ``model`` as it was."""
    probe, _ = fused_probe(model, inputs)
    before = expected_outputs(model, probe, modes=(False,), gradients=False) if check and probe is not None else None
    vanilla = tree_copy(model).eval()  # the modules and hooks are its own, the tensors model's
    blocks = remove(vanilla)
    with tempfile.TemporaryDirectory(prefix="asr-fx-fuse-") as folder:
        written: list[tuple[torch.Tensor, str]] = []

        def keep(tensor: torch.Tensor) -> None:
            path = os.path.join(folder, f"{len(written)}.pt")
            torch.save(tensor.detach().clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else
                       tensor.detach(), path)
            written.append((tensor, path))

        try:
            with folding_in_place(before_write=keep):
                gm, records = fuse_pipeline(graph_form(vanilla, blocks, leaves, inputs),
                                            FuseOptions(fold_bn, inputs, leaves))
            report = _report(model, gm, records, strict)
            if check:
                check_fused(model, gm.eval(), inputs, before=before)
            probe = inputs if inputs is not None else _runs_on(vanilla, derive_probe(vanilla))
            result = fuse_into(gm.eval(), vanilla, model, example_inputs=probe, leaf_modules=leaves,
                               keep_on_refusal=False)
        except BaseException:
            with torch.no_grad():
                for tensor, path in reversed(written):
                    tensor.copy_(torch.load(path, weights_only=True))
            raise
    result.__dict__[FUSION_KEY] = report
    return _in_place(model, result)


def _runs_on(model: nn.Module, probe: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """``probe`` when ``model`` runs on it in eval mode (state kept), else None."""
    if probe is None:
        return None
    try:
        with saved_state(model):
            run_on_copies(model, probe, False)
    except Exception:  # noqa: BLE001 - a guessed input the model does not take: no probe
        return None
    return probe


def _in_place(model: nn.Module, fused: nn.Module) -> nn.Module:
    """``fused``'s weights written into ``model`` itself, ASR removed from it (``fuse(..., inplace=True)``)."""
    if isinstance(fused, fx.GraphModule) or type(fused) is not type(model):
        raise ASRError(f"fuse(..., inplace=True): the fused model is a {type(fused).__name__}, which cannot go into "
                       f"{type(model).__name__} itself; leave inplace off")
    remove(model)
    for path, part in fused.named_modules():
        if isinstance(part, fx.GraphModule) and path:  # a fused captured part: put it in as it is
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, part)
    model.load_state_dict(fused.state_dict())
    model.__dict__[FUSION_KEY] = fusion_report(fused)
    return model.eval()


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
