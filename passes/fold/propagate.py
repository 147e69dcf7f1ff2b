"""Propagate pass: push a constant per-channel scale that its producer could not take forward,
through ops that commute with it, into the input channels of the next conv/linear/BN.

Equivalence: ``next(op(x * s)) == next'(op(x))`` where ``op`` commutes with the scale:
``op(x * s) == op(x) * s`` (dropout in eval, identity, average pooling, flatten and
channel-preserving reshapes and permutes for any ``s``; ReLU, LeakyReLU and max pooling for
``s >= 0``; ReLU6, Hardtanh and clamp only for ``s == 1``) and ``next'`` has its input channels
scaled (the layer rules' :meth:`~asr_fx.passes.layers.base.LayerRule.input_target`; an eval BN takes ``mean/s`` and
``(var + eps)/s^2``). Every user of the scaled value, transitively through those ops, must be such
a layer: if one is not (an add, a model output, GELU, sigmoid, a negative scale through ReLU ...),
nothing changes and the reason is reported.

The scale also goes through a ``cat`` along its channel dimension (the other pieces get a scale
of 1) and through another constant ``mul`` (scales commute).

Refuses too: a next layer called at more than one place or sharing a parameter, an erase that would
redirect or drop an in-place write into storage something else reads, a model input included
(:func:`asr_fx.passes.graph.aliases.erase_refusal`), a scale that would change a dtype, and reshapes
whose shapes are unknown (pass ``example_inputs`` to :func:`asr_fx.fuse`). Modifies ``gm`` in place. Emits a new
record for each
scale it moves or tried to move; it never edits the fold pass's records.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..graph.aliases import erase_refusal
from ..graph.graph_queries import node_label, reads_only_metadata
from ..graph.op_tables import CAT_FUNCTIONS
from ..graph.records import FoldRecord
from ..graph.refusals import NoMatch, Refusal
from ..infra import PassResult
from ..layers.base import Target, TensorUsage
from ..layers.registry import input_target
from .apply import apply_fold
from .fold_guards import written_scale
from .fold_plan import match, plan_kinds, plan_labels, plan_refusal, through_cat
from .scale_algebra import (
    MulFold,
    Plan,
    ScaleState,
    constant_mul_input,
    constant_operand,
    map_through,
    per_channel_scale,
)


def _occurrences(user: fx.Node, node: fx.Node) -> int:
    seen: list[fx.Node] = []
    fx.node.map_arg((user.args, user.kwargs), lambda n: seen.append(n) or n)  # type: ignore[func-returns-value]
    return sum(n is node for n in seen)


def plan_forward(gm: fx.GraphModule, root: fx.Node, state: ScaleState, usage: TensorUsage,
                 budget: int = 256) -> Plan | Refusal:
    """Every layer that must take the scale on ``root``'s value, with its 1-D scale, or the reason.
    Plans only: nothing changes."""
    plan: Plan = []
    stack = [(root, state)]
    while stack:
        node, st = stack.pop()
        for user in node.users:
            moved: ScaleState | Refusal | NoMatch
            budget -= 1
            if budget < 0:
                return Refusal("the scaled value reaches too many nodes")
            if reads_only_metadata(user):
                continue
            if user.op == "output":
                return Refusal("the scaled value is a model output")
            if user.op == "call_function" and user.target in CAT_FUNCTIONS and _occurrences(user, node) == 1:
                moved = through_cat(gm, user, node, st)
                if isinstance(moved, Refusal):
                    return moved
                stack.append((user, moved))
                continue
            if constant_mul_input(gm, user) is node and _occurrences(user, node) == 1:
                stack.append((user, st))  # another constant scale commutes with this one
                continue
            if not user.args or user.args[0] is not node or _occurrences(user, node) > 1:
                return Refusal(f"the scaled value flows into `{node_label(user)}`, which does not commute with a scale")
            target = input_target(gm, user)
            if isinstance(target, Target):
                vec = match(target, st, usage)
                if isinstance(vec, Refusal):
                    return vec
                plan.append((target, vec))
                continue
            moved = map_through(gm, user, st, forward=True)
            if isinstance(moved, Refusal):
                return moved
            if not isinstance(moved, ScaleState):
                return Refusal(f"the scaled value flows into `{node_label(user)}`, which does not commute with a scale")
            stack.append((user, moved))
    if not plan:
        return Refusal("the scaled value reaches no conv/linear/BN")
    return plan


def plan_push(gm: fx.GraphModule, mul: fx.Node, usage: TensorUsage) -> MulFold | Refusal | NoMatch:
    """The plan that pushes ``mul``'s constant into the layers after it, why there is none, or
    :class:`NoMatch` (not a per-channel constant ``mul``: nothing to say beyond the fold pass's record).
    Nothing changes."""
    operands = constant_operand(gm, mul)
    if operands is None:
        return NoMatch("not a multiply by a constant")
    x, c = operands
    state = per_channel_scale(c, mul, x)
    if isinstance(state, Refusal):
        return NoMatch(state.reason)
    written = written_scale(gm, mul, x)
    if written:
        return written
    aliased = erase_refusal(gm, mul, x)
    if aliased is not None:
        return aliased
    with torch.no_grad():
        plan = plan_forward(gm, mul, ScaleState(state.values.detach(), state.position), usage)
    if isinstance(plan, Refusal):
        return plan
    return plan_refusal(c, plan) or MulFold(mul, x, plan)


def propagate_scales(gm: fx.GraphModule, fold_records: list[FoldRecord]) -> PassResult:
    """Push every constant scale the fold pass left as a ``mul`` (per ``fold_records``) into the
    layers after it. Returns one new record per such ``mul``: pushed forward (``where`` the layers
    took it, ``reason`` "pushed forward (<why the producer could not>)"), or still left as a ``mul``
    with "; not pushed forward: <why>" added to the fold pass's reason."""
    left = [r for r in fold_records if not r.folded]
    if not left:
        return PassResult(gm)
    usage = TensorUsage(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    records: list[FoldRecord] = []
    for record in left:
        if record.mul not in nodes:
            continue
        fold = plan_push(gm, nodes[record.mul], usage)
        if isinstance(fold, NoMatch):
            continue
        if isinstance(fold, Refusal):
            records.append(dataclasses.replace(record, reason=f"{record.reason}; not pushed forward: {fold.reason}"))
        else:
            apply_fold(gm, fold)
            records.append(dataclasses.replace(record, where=plan_kinds(fold.plan), into=plan_labels(fold.plan),
                                               reason=f"pushed forward ({record.reason})"))
    gm.recompile()
    return PassResult(gm, tuple(records))
