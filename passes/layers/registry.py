"""The layer registry: every layer rule, in the order they are asked, and the questions placement and
fold both ask through it, so the two cannot disagree about what can take a scale.

- :func:`layer_at` (placement): the layer a site after ``node`` would follow, if a site may go there;
- :func:`output_target` (fold, backward): what folds ``node(x) * v``;
- :func:`input_target` (fold, forward): what folds ``node(x * s)``;
- :func:`shared_layer_refusal`: why a fold into the layer at ``node`` would change another call.

A layer module whose output is not what its weights suggest (forward hooks, a parametrization, a replaced
forward, an InstanceNorm corner case: :mod:`~.guards`) stays a :class:`Target` (its channels still count), but
one that refuses every scale with the guard's reason.

Adding a layer family is one file in this folder defining a :class:`~.base.LayerRule`, its entry in
:data:`LAYER_RULES`, and its test in ``tests/passes/layers/``.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph.graph_queries import output_dtype
from .base import LayerMatch, LayerRule, NoMatch, Refusal, Target, TargetOrRefusal, TensorUsage
from .functional_conv_linear import FUNCTIONAL_CONV_LINEAR
from .functional_norm import FUNCTIONAL_NORM
from .guards import instance_norm_refusal, layer_refusal, model_dtype
from .module_calls import MODULE_RULES
from .multihead_attention import MULTIHEAD_ATTENTION
from .parallel_branches import PARALLEL_BRANCHES
from .sdpa import SDPA
from .standardized_conv import STANDARDIZED_CONV
from .window_attention import WINDOW_ATTENTION

#: every layer rule, in the order they are asked (a weight-standardized conv before the plain
#: functional conv it is also a call of)
LAYER_RULES: tuple[LayerRule, ...] = (*MODULE_RULES, MULTIHEAD_ATTENTION, WINDOW_ATTENTION, STANDARDIZED_CONV,
                                      FUNCTIONAL_CONV_LINEAR, FUNCTIONAL_NORM, SDPA, PARALLEL_BRANCHES)


def recognise(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | NoMatch:
    """The first rule's match of ``node``, else a :class:`NoMatch` naming ``node``."""
    for rule in LAYER_RULES:
        found = rule.recognise(gm, node)
        if isinstance(found, LayerMatch):
            return found
    return NoMatch(f"`{node.name}` is no layer any rule recognises")


def layer_at(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
    """The layer a placement site right after ``node`` follows, or ``None`` (no layer, or one placement
    offers no site after: :attr:`~.base.LayerRule.is_site`)."""
    found = recognise(gm, node)
    return found if isinstance(found, LayerMatch) and found.rule.is_site else None


def _first(answers: list[TargetOrRefusal], node: fx.Node) -> TargetOrRefusal:
    refusals = [a for a in answers if isinstance(a, Refusal)]
    return refusals[0] if refusals else NoMatch(f"`{node.name}` is no layer any rule recognises")


def _guarded(target: Target, why: Refusal | None) -> Target:
    """``target``, made to refuse every scale with ``why`` (when given), its reason prefixed by the layer."""
    if why is not None:
        refusal = Refusal(f"`{target.label}`: {why.reason}")
        target.refuse = lambda v: refusal
    return target


def output_target(gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
    """What folds ``node(x) * v``: the first rule's :class:`Target`, else the first rule's refusal. A
    layer without floating parameters (a norm without affine) computes in the recorded dtype of ``node``,
    else in the one dtype of the model's tensors. A guarded layer module (:mod:`~.guards`) refuses every scale."""
    answers: list[TargetOrRefusal] = []
    for rule in LAYER_RULES:
        found = rule.output_target(gm, node)
        if isinstance(found, Target):
            if found.dtype is None:
                found.dtype = output_dtype(node) or model_dtype(gm)
            if node.op == "call_module" and found.module is not None:
                return _guarded(found, layer_refusal(found.module) or
                                instance_norm_refusal(found.module, node, found.channels))
            return found
        answers.append(found)
    return _first(answers, node)


def input_target(gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
    """What folds ``node(x * s)`` (a scale on the layer's input channels): the first rule's
    :class:`Target`, else the first rule's refusal."""
    answers: list[TargetOrRefusal] = []
    for rule in LAYER_RULES:
        found = rule.input_target(gm, node)
        if isinstance(found, Target):
            return _guarded(found, layer_refusal(found.module)) if node.op == "call_module" else found
        answers.append(found)
    return _first(answers, node)


def shared_layer_refusal(gm: fx.GraphModule, node: fx.Node, usage: TensorUsage) -> Refusal | None:
    """Why folding a scale after ``node`` into its layer would change another call of it or a tied
    weight (:meth:`TensorUsage.refusal`), else ``None`` (also where no layer takes it)."""
    target = output_target(gm, node)
    return usage.refusal(target) if isinstance(target, Target) else None
