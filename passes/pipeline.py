"""The fusion pipeline: the passes :func:`asr_fx.fuse` runs, declared as data (:data:`FUSE_PIPELINE`).

Each step is ``(module, context) -> PassResult`` over the pass it names; the options of a run
(``fold_bn``, ``example_inputs``, ``leaf_modules``) are in ``context.options``. The first two steps
work on the instrumented model (every GraphModule in it), the rest on the inference graph traced
from it. Equivalence: each pass keeps the eval-mode function (see its docstring); so does their sequence.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from .bn_affine_training_form import from_bn_affine_form
from .check_finite import check_finite_constants
from .cleanup import drop_dead_nodes, eliminate_dead_code
from .constant_fold import fold_constants
from .fold import fold_scales
from .fold_conv_bn import fold_conv_bn
from .hoist_attention_values import unhoist_attention_values
from .infra import PassContext, PassResult, Pipeline, graph_modules
from .propagate import propagate_scales
from .records import FoldRecord
from .scale_spellings import normalize_scale_spellings
from .shapes import as_input_tuple, record_example_shapes
from .trace import trace


def unhoist_values(module: nn.Module, context: PassContext) -> PassResult:
    """Every ASR block computes its ``v`` at its site again (:func:`unhoist_attention_values`)."""
    return PassResult(module, sum(unhoist_attention_values(gm) for gm in graph_modules(module)) > 0)


def leave_bn_affine_form(module: nn.Module, context: PassContext) -> PassResult:
    """BN-affine blocks go back to ``bn(x)`` with ``v`` in BN's affine (:func:`from_bn_affine_form`)."""
    records = tuple(r for gm in graph_modules(module) for r in from_bn_affine_form(gm).records)
    return PassResult(module, bool(records), records)


def trace_for_inference(module: nn.Module, context: PassContext) -> PassResult:
    """Trace with ASR blocks inlined and training flags as they are (the fused graph is for inference)."""
    inputs = as_input_tuple(context.options.get("example_inputs"))  # shape-aware tracing (a model not instrumented)
    return PassResult(trace(module, context.options.get("leaf_modules"), bind_training=False, example_inputs=inputs),
                      True)


def fold_constant_values(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """Each ``act(F(psi))`` (any parameter-only value that is multiplied in) becomes one buffer."""
    return PassResult(fold_constants(gm), True)


def spell_scales_as_muls(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """``x / c``, ``addcmul`` and ``einsum`` scales become multiplies (:func:`normalize_scale_spellings`)."""
    return PassResult(gm, normalize_scale_spellings(gm))


def refuse_non_finite_values(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """Refuse NaN/Inf constants before any fold (:func:`check_finite_constants`)."""
    check_finite_constants(gm)
    return PassResult(gm, False)


def drop_unused_nodes(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """The attention networks, now unused, leave the graph (:func:`drop_dead_nodes`)."""
    return PassResult(drop_dead_nodes(gm), True)


def fold_into_producers(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """Each constant per-channel ``mul`` folds into the layer before it (:func:`fold_scales`)."""
    return fold_scales(gm)


def push_into_next_layers(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """What stayed a ``mul`` is pushed into the layers after it (:func:`propagate_scales`)."""
    return propagate_scales(gm, context.records_of(FoldRecord))


def remove_dead_code(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """Dead nodes, unused submodules, parameters and buffers go (:func:`eliminate_dead_code`)."""
    return PassResult(eliminate_dead_code(gm), True)


def fold_batch_norms(gm: fx.GraphModule, context: PassContext) -> PassResult:
    """With ``fold_bn``: each eval BatchNorm after a conv folds into it (:func:`fold_conv_bn`), then cleanup."""
    if not context.options.get("fold_bn"):
        return PassResult(gm, False)
    return PassResult(eliminate_dead_code(fold_conv_bn(gm)), True)


#: what :func:`asr_fx.fuse` runs, in order, on a private eval-mode copy of the model
FUSE_PIPELINE = Pipeline("fuse", (
    unhoist_values,
    leave_bn_affine_form,
    trace_for_inference,
    record_example_shapes,
    fold_constant_values,
    spell_scales_as_muls,
    refuse_non_finite_values,
    drop_unused_nodes,
    fold_into_producers,
    push_into_next_layers,
    remove_dead_code,
    fold_batch_norms,
))


def fuse_pipeline(model: nn.Module, **options: Any) -> tuple[fx.GraphModule, list[FoldRecord]]:
    """Run :data:`FUSE_PIPELINE` on ``model`` (an eval-mode copy; modified in place); returns the
    fused GraphModule and every :class:`FoldRecord` the passes made, in order. Options: ``fold_bn``,
    ``example_inputs``, ``leaf_modules``."""
    gm, records = FUSE_PIPELINE.run(model, **options)
    return gm, [r for r in records if isinstance(r, FoldRecord)]  # type: ignore[return-value]
