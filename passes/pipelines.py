"""The two declared pipelines, side by side: :data:`INSTRUMENT_PIPELINE` (what :func:`asr_fx.instrument`
runs) and :data:`FUSE_PIPELINE` (what :func:`asr_fx.fuse` runs), each with its typed options
(:class:`InstrumentOptions`, :class:`FuseOptions`, read by the steps as ``context.options``).

Each step is ``(module, context) -> PassResult`` over the pass it names. The instrument steps work on a
copy of the model: trace, choose sites, insert blocks, then apply the :data:`TRAINING_FORMS`. Each
training form is declared once as a pair (:class:`TrainingForm`): ``apply`` runs last in instrument,
``undo`` first in fuse (in reverse order), on the instrumented model (every GraphModule in it); the
rest of fuse works on the inference graph traced from it. Equivalence: each pass keeps the eval-mode
function (see its docstring); so does their sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asr_fx.errors import NoSitesError, UnfoldableSiteError

from .capture.shapes import as_input_tuple, record_example_shapes
from .capture.trace import trace
from .fold.check_finite import check_finite_constants
from .fold.cleanup import drop_dead_nodes, eliminate_dead_code
from .fold.constant_fold import fold_constants
from .fold.fold import fold_scales
from .fold.fold_conv_bn import fold_conv_bn
from .fold.propagate import propagate_scales
from .fold.scale_spellings import normalize_scale_spellings
from .forms.bn_affine_training_form import from_bn_affine_form, to_bn_affine_form
from .forms.convert_existing import convert_existing_attention, pooled_means
from .forms.hoist_attention_values import (
    hoist_attention_values,
    unhoist_attention_values,
)
from .forms.insert import insert_asr
from .graph.records import FoldRecord
from .infra import Pass, PassContext, PassResult, Pipeline, graph_modules
from .placement.attention_patterns import ChannelAttention, find_channel_attention
from .placement.locate import Site
from .placement.rules import PLACEMENT_RULES, placement_rule
from .placement.select import SiteSelector, select_sites


@dataclass(frozen=True)
class SiteBlocks:
    """How one ``instrument`` call makes its blocks, once the sites are chosen (a preset may depend on
    them): ``make(site)`` builds a site's block; ``existing_psi_init`` starts a converted attention's psi."""

    make: Callable[[Site], nn.Module]
    existing_psi_init: float


#: the ``blocks`` option of :data:`INSTRUMENT_PIPELINE`: every chosen site -> how to make the blocks
BlockFactory = Callable[[Sequence[Site]], SiteBlocks]


@dataclass(frozen=True)
class InstrumentOptions:
    """The options of one :data:`INSTRUMENT_PIPELINE` run. ``model_name`` names the model in messages;
    ``rule``/``sites``/``exclude`` choose the sites; ``blocks`` makes their blocks (the attention registry
    lives above ``passes/``, so ``instrument`` passes it in); ``convert_existing`` also converts the model's
    own channel attention; ``bn_affine_form`` applies the BN-affine training form; ``example_inputs`` and
    ``leaf_modules`` go to tracing."""

    model_name: str
    blocks: BlockFactory
    rule: str = "auto"
    sites: SiteSelector = None
    exclude: SiteSelector = None
    learnable_psi: bool = True
    convert_existing: bool = False
    bn_affine_form: bool = True
    example_inputs: tuple[Any, ...] | None = None
    leaf_modules: Any = None


@dataclass(frozen=True)
class FuseOptions:
    """The options of one :data:`FUSE_PIPELINE` run: ``fold_bn`` folds eval BatchNorms into the convs
    before them; ``example_inputs`` (recorded shapes, shape-aware tracing) and ``leaf_modules`` go to tracing."""

    fold_bn: bool = False
    example_inputs: tuple[Any, ...] | None = None
    leaf_modules: Any = None


@dataclass(frozen=True)
class PooledMeans:
    """The batch mean of each existing attention's pooled value on ``example_inputs`` (psi's start)."""

    values: dict[str, torch.Tensor]


# --- the instrument steps ------------------------------------------------------------------------------

def trace_model(module: nn.Module, context: PassContext) -> PassResult:
    """Trace the (copied) model with asr-fx's leaf rules (:func:`~.capture.trace.trace`)."""
    o: InstrumentOptions = context.options
    return PassResult(trace(module, o.leaf_modules, example_inputs=o.example_inputs))


def choose_sites(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """Report pass: the sites (``sites=``/``rule=``, less ``exclude=``) and, with ``convert_existing``, the
    model's own channel attention. Refuses no site at all, and sites that could not fold after training."""
    o: InstrumentOptions = context.options
    chosen = select_sites(gm, o.rule, o.sites, o.exclude)
    existing = find_channel_attention(gm) if o.convert_existing else []
    if not chosen and not existing:
        found = placement_rule(o.rule)
        looked = (found.looks_for if found else "the sites named by sites=") if o.sites is None else \
            "the sites named by sites=, less exclude="
        leaves = list(gm.meta.get("asr_fx.mode_leaves") or [])
        opaque = [p for p in leaves if not any(p.startswith(f"{q}.") for q in leaves)]  # the outermost ones
        inside = (f" Kept as one call each because their forward branches on self.training: {opaque}; with "
                  "example_inputs=(...) asr-fx looks for sites inside them.") if opaque else ""
        raise NoSitesError(
            f"no ASR site found in {o.model_name} with rule={o.rule!r}: looked for {looked}.{inside} "
            f"Pass sites=[module names] or another rule (one of {sorted(PLACEMENT_RULES)}).", opaque_modules=opaque
        )
    unfoldable = [f"{s.node} ({s.reason})" for s in chosen if not s.foldable]
    if unfoldable:
        raise UnfoldableSiteError(f"sites {unfoldable} cannot fold after training; leave them out with exclude=[...]"
                                  + (" or pass example_inputs=" if any("example_inputs" in u for u in unfoldable)
                                     else ""), sites=unfoldable)
    return PassResult(gm, (*chosen, *existing))


def measure_existing_attention(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """With ``example_inputs``: the pooled means that start each converted attention's psi (:func:`pooled_means`)."""
    existing, inputs = context.records_of(ChannelAttention), context.options.example_inputs
    if not existing or inputs is None:
        return PassResult(gm)
    return PassResult(gm, (PooledMeans(pooled_means(gm, existing, inputs)),))


def insert_blocks(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """One ASR block (or ``delta`` of them) after each chosen site (:func:`~.forms.insert.insert_asr`)."""
    sites = context.records_of(Site)
    return PassResult(insert_asr(gm, sites, context.options.blocks(sites).make))


def convert_existing_blocks(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """With ``convert_existing``: each channel attention becomes an ASR block (:func:`convert_existing_attention`)."""
    o: InstrumentOptions = context.options
    if not context.records_of(ChannelAttention):
        return PassResult(gm)
    means = context.records_of(PooledMeans)
    existing = find_channel_attention(gm)  # node names are kept; the scaled tensors may now be ASR outputs
    convert_existing_attention(gm, existing, psi_init=o.blocks(context.records_of(Site)).existing_psi_init,
                               psi_values=means[0].values if means else None, learnable_psi=o.learnable_psi)
    return PassResult(gm)


# --- the training forms, each applied by instrument and undone by fuse ---------------------------------

def into_bn_affine_form(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """With ``bn_affine_form``: blocks right after an affine BatchNorm take the BN-affine training form."""
    return to_bn_affine_form(gm) if context.options.bn_affine_form else PassResult(gm)


def leave_bn_affine_form(module: nn.Module, context: PassContext) -> PassResult:
    """BN-affine blocks go back to ``bn(x)`` with ``v`` in BN's affine (:func:`from_bn_affine_form`)."""
    return PassResult(module, tuple(r for gm in graph_modules(module) for r in from_bn_affine_form(gm).records))


def hoist_values(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """Every block's ``v`` is computed at the top of the graph (:func:`hoist_attention_values`)."""
    hoist_attention_values(gm)
    return PassResult(gm)


def unhoist_values(module: nn.Module, context: PassContext) -> PassResult:
    """Every ASR block computes its ``v`` at its site again (:func:`unhoist_attention_values`)."""
    for gm in graph_modules(module):
        unhoist_attention_values(gm)
    return PassResult(module)


@dataclass(frozen=True)
class TrainingForm:
    """A rewrite that keeps the function but makes training cheaper: ``apply`` is instrument's last step
    (or one of them), ``undo`` takes it out again at the start of fuse, before the model is traced for
    inference, so that fuse sees the ordinary ``x * v`` blocks."""

    name: str
    apply: Pass
    undo: Pass


#: the training forms, in the order instrument applies them (fuse undoes them in reverse)
TRAINING_FORMS = (
    TrainingForm("bn_affine", into_bn_affine_form, leave_bn_affine_form),
    TrainingForm("hoisted_values", hoist_values, unhoist_values),
)

#: the reading half of :func:`asr_fx.instrument`, on a copy of the model: the sites and their blocks, in the
#: graph. Options: ``model_name``, ``rule``, ``sites``, ``exclude``, ``convert_existing``, ``learnable_psi``,
#: ``bn_affine_form``, ``example_inputs``, ``leaf_modules`` and ``blocks`` (a :data:`BlockFactory`).
READ_PIPELINE = Pipeline("instrument", (
    trace_model,
    record_example_shapes,
    choose_sites,
    measure_existing_attention,
    insert_blocks,
))

#: the rest of the graph form (a model whose sites have no place in its modules, or ``convert_existing``):
#: :func:`asr_fx.instrument` puts the blocks on the model's own modules otherwise (:mod:`asr_fx.own_model`)
GRAPH_FORM_PIPELINE = Pipeline("instrument-graph-form", (
    convert_existing_blocks,
    *(form.apply for form in TRAINING_FORMS),
))

#: what :func:`asr_fx.instrument` runs for the graph form, in order, on a copy of the model
INSTRUMENT_PIPELINE = Pipeline("instrument", READ_PIPELINE.passes + GRAPH_FORM_PIPELINE.passes)


# --- the fuse steps ------------------------------------------------------------------------------------

def trace_for_inference(module: nn.Module, context: PassContext) -> PassResult:
    """Trace with ASR blocks inlined and training flags as they are (the fused graph is for inference)."""
    o: FuseOptions = context.options
    inputs = as_input_tuple(o.example_inputs)  # shape-aware tracing (a model not instrumented)
    return PassResult(trace(module, o.leaf_modules, bind_training=False, example_inputs=inputs))


def fold_constant_values(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """Each ``act(F(psi))`` (any parameter-only value that is multiplied in) becomes one buffer."""
    return PassResult(fold_constants(gm))


def push_into_next_layers(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """What stayed a ``mul`` is pushed into the layers after it (:func:`propagate_scales`)."""
    return propagate_scales(gm, context.records_of(FoldRecord))


def remove_dead_code(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """Dead nodes, unused submodules, parameters and buffers go (:func:`eliminate_dead_code`)."""
    return PassResult(eliminate_dead_code(gm))


def fold_batch_norms(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """With ``fold_bn``: each eval BatchNorm after a conv folds into it (:func:`fold_conv_bn`), then cleanup."""
    if not context.options.fold_bn:
        return PassResult(gm)
    return PassResult(eliminate_dead_code(fold_conv_bn(gm)))


#: what :func:`asr_fx.fuse` runs, in order, on a private eval-mode copy of the model (:class:`FuseOptions`)
FUSE_PIPELINE = Pipeline("fuse", (
    *(form.undo for form in reversed(TRAINING_FORMS)),
    trace_for_inference,
    record_example_shapes,
    fold_constant_values,
    normalize_scale_spellings,  # x / c, addcmul and einsum scales become multiplies
    check_finite_constants,  # refuse NaN/Inf constants before any fold
    drop_dead_nodes,  # the attention networks, now unused, leave the graph
    fold_scales,  # each constant per-channel mul folds into the layer before it
    push_into_next_layers,
    remove_dead_code,
    fold_batch_norms,
))


def fuse_pipeline(model: nn.Module, options: FuseOptions | None = None) -> tuple[fx.GraphModule, list[FoldRecord]]:
    """Run :data:`FUSE_PIPELINE` on ``model`` (an eval-mode copy; modified in place); returns the
    fused GraphModule and every :class:`FoldRecord` the passes made, in order."""
    gm, records = FUSE_PIPELINE.run(model, options or FuseOptions())
    return gm, [r for r in records if isinstance(r, FoldRecord)]  # type: ignore[return-value]
