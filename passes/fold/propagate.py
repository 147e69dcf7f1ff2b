"""Propagate pass: push a constant per-channel scale that its producer could not take forward,
through ops that commute with it, into the input channels of the next conv/linear/BN.

Equivalence: ``next(op(x * s)) == next'(op(x))`` where ``op`` commutes with the scale:
``op(x * s) == op(x) * s`` (dropout in eval, identity, average pooling, flatten and
channel-preserving reshapes and permutes for any ``s``; ReLU, LeakyReLU and max pooling for
``s >= 0``; ReLU6, Hardtanh and clamp only for ``s == 1``) and ``next'`` has its input channels
scaled (:func:`asr_fx.passes.fold.fold_targets.scale_inputs`; an eval BN takes ``mean/s`` and
``(var + eps)/s^2``). Every user of the scaled value, transitively through those ops, must be such
a layer: if one is not (an add, a model output, GELU, sigmoid, a negative scale through ReLU ...),
nothing changes and the reason is reported.

The scale also goes through a ``cat`` along its channel dimension (the other pieces get a scale
of 1) and through another constant ``mul`` (scales commute).

Refuses too: a next layer called at more than one place or sharing a parameter, an erase that would
redirect or drop an in-place write into storage something else reads, a model input included
(:func:`asr_fx.passes.graph.aliases.erase_refusal`), a scale that would change a dtype, and reshapes whose shapes are unknown (pass
``example_inputs`` to :func:`asr_fx.fuse`). Modifies ``gm`` in place. Emits a new record for each
scale it moves or tried to move; it never edits the fold pass's records.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..graph.aliases import erase_refusal
from .fold_plan import fold_mul, match, module_input_target, plan_kinds, plan_labels, through_cat
from .fold_targets import TensorUsage
from ..graph.graph_queries import node_label, reads_only_metadata
from ..infra import PassResult
from ..graph.op_tables import CAT_FUNCTIONS
from ..graph.records import FoldRecord
from .scale_algebra import Plan, State, constant_mul_input, constant_operand, map_through, per_channel_scale


def _occurrences(user: fx.Node, node: fx.Node) -> int:
    seen: list[fx.Node] = []
    fx.node.map_arg((user.args, user.kwargs), lambda n: seen.append(n) or n)
    return sum(n is node for n in seen)


def plan_forward(gm: fx.GraphModule, root: fx.Node, state: State, usage: TensorUsage,
                 budget: int = 256) -> Plan | str:
    """Every layer that must take the scale on ``root``'s value, with its 1-D scale, or the reason."""
    plan: Plan = []
    stack = [(root, state)]
    while stack:
        node, st = stack.pop()
        for user in node.users:
            budget -= 1
            if budget < 0:
                return "the scaled value reaches too many nodes"
            if reads_only_metadata(user):
                continue
            if user.op == "output":
                return "the scaled value is a model output"
            if user.op == "call_function" and user.target in CAT_FUNCTIONS and _occurrences(user, node) == 1:
                moved = through_cat(gm, user, node, st)
                if isinstance(moved, str):
                    return moved
                stack.append((user, moved))
                continue
            if constant_mul_input(gm, user) is node and _occurrences(user, node) == 1:
                stack.append((user, st))  # another constant scale commutes with this one
                continue
            if not user.args or user.args[0] is not node or _occurrences(user, node) > 1:
                return f"the scaled value flows into `{node_label(user)}`, which does not commute with a scale"
            target = module_input_target(gm, user)
            if target is not None:
                vec = match(target, st, usage)
                if isinstance(vec, str):
                    return vec
                plan.append((target, vec))
                continue
            moved = map_through(gm, user, st, forward=True)
            if moved is None:
                return f"the scaled value flows into `{node_label(user)}`, which does not commute with a scale"
            if isinstance(moved, str):
                return moved
            stack.append((user, moved))
    if not plan:
        return "the scaled value reaches no conv/linear/BN"
    return plan


def _push_forward(gm: fx.GraphModule, mul: fx.Node, usage: TensorUsage) -> Plan | str | None:
    """Push ``mul``'s constant into the layers after it: the plan applied, why not, or ``None``
    (not a per-channel constant ``mul``: nothing to say beyond the fold pass's record)."""
    operands = constant_operand(gm, mul)
    if operands is None:
        return None
    x, c = operands
    state = per_channel_scale(c, mul, x)
    if isinstance(state, str):
        return None
    aliased = erase_refusal(gm, mul, x)
    if aliased:
        return aliased
    with torch.no_grad():
        plan = plan_forward(gm, mul, (state[0].detach(), state[1]), usage)
    return plan if isinstance(plan, str) else fold_mul(gm, plan, c, mul, x)


def propagate_scales(gm: fx.GraphModule, fold_records: list[FoldRecord]) -> PassResult:
    """Push every constant scale the fold pass left as a ``mul`` (per ``fold_records``) into the
    layers after it. Returns one new record per such ``mul``: pushed forward (``where`` the layers
    took it, ``reason`` "pushed forward (<why the producer could not>)"), or still left as a ``mul``
    with "; not pushed forward: <why>" added to the fold pass's reason."""
    left = [r for r in fold_records if not r.folded]
    if not left:
        return PassResult(gm, False)
    usage = TensorUsage(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    records: list[FoldRecord] = []
    for record in left:
        if record.mul not in nodes:
            continue
        outcome = _push_forward(gm, nodes[record.mul], usage)
        if outcome is None:
            continue
        if isinstance(outcome, str):
            records.append(dataclasses.replace(record, reason=f"{record.reason}; not pushed forward: {outcome}"))
        else:
            records.append(dataclasses.replace(record, where=plan_kinds(outcome), into=plan_labels(outcome),
                                               reason=f"pushed forward ({record.reason})"))
    gm.recompile()
    return PassResult(gm, any(r.folded for r in records), tuple(records))
