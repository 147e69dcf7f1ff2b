"""Fold pass: ``mul(layer(x), c)`` with ``c`` a per-channel constant becomes ``layer'(x)``.

Equivalence: ``layer'(x) == layer(x) * c`` for every input, by the formulas of
the layer rules (:mod:`asr_fx.passes.layers`, the paper's Appendix A), up to float rounding.

Matches ``operator.mul``/``imul``, ``torch.mul``, ``Tensor.mul``/``mul_`` in either operand order,
where ``c`` is a ``get_attr`` tensor (possibly through ``expand_as(x)``/``type_as(x)``/``to(x.dtype)``)
(a parameter such as a layer scale, or what :func:`fold_constants` made of ``act(F(psi))``) that is
one value, or varies along one dimension
(``(1,C,1,1)``, ``(C,1,1)``, ``(C,)``, ``(1,1,C)``, ...). The layer is a call of a conv /
conv-transpose (any groups), BN / SyncBN, GN, IN, LN or linear module, ``getitem(mha(...), 0)`` of
an ``nn.MultiheadAttention`` (its output projection), or a functional form on attribute weights
(:mod:`asr_fx.passes.layers.functional_conv_linear`, :mod:`asr_fx.passes.layers.functional_norm`).
Between the layer and the ``mul`` the scale also moves back through ops that commute with it (ReLU / max pooling for
``c >= 0``, average pooling, dropout,
identity, permutes and channel-preserving reshapes), into both inputs of an ``add`` and into the
pieces of a channel ``cat``, as long as each value on the way has no other user.

Refuses (records the reason and leaves the ``mul`` for :func:`propagate_scales`): a value on the
way with other users (folding would change them), a module called at more than one place,
parameters shared with another module or call (tied weights), an in-place ``mul_`` of a value that
something reads before it, an erase that would redirect an in-place write into storage something
else reads (:func:`asr_fx.passes.graph.aliases.erase_refusal`), a scale that would change a dtype,
scales that vary along more than one dimension or not along the layer's channels, scales that broadcast the value to
a larger shape, and layers without a rule.

Shapes: with recorded shapes (``example_inputs`` to :func:`asr_fx.fuse`) every broadcast is
checked. Without them, a scale with a leading batch dimension (``(1,C,1,1)``, ``(1,1,C)``) is taken
to match a batched layer output, as it does in a model run on batches; rank-dependent layers
(BatchNorm1d, GroupNorm, reshapes) need the shapes and are refused without them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..graph.aliases import erase_refusal
from ..graph.graph_queries import is_add, is_inplace, site_of
from ..graph.records import LEFT_AS_MUL, FoldRecord
from ..graph.refusals import Refusal
from ..infra import PassContext, PassResult
from ..layers.base import Target, TensorUsage
from ..layers.registry import output_target
from .apply import apply_fold
from .constant_fold import FOLDED_PREFIX
from .fold_guards import promotes, written_scale
from .fold_plan import cat_pieces, match, plan_kinds, plan_labels, plan_refusal
from .scale_algebra import (
    MulFold,
    Plan,
    ScaleState,
    constant_mul_input,
    constant_node,
    constant_operand,
    map_through,
    other_users,
    per_channel_scale,
)


def _computed(mul: fx.Node, x: fx.Node) -> bool:
    """Whether the scale was computed from parameters (folded by :func:`fold_constants`), as an
    attention value is, rather than being a parameter itself (a layer scale)."""
    c = constant_node(mul, x)
    return c is not None and str(c.target).startswith(FOLDED_PREFIX)


def plan_backward(gm: fx.GraphModule, node: fx.Node, state: ScaleState, usage: TensorUsage,
                  budget: list[int]) -> Plan | Refusal:
    """The layers that must take ``state`` so that ``node``'s value comes out scaled, or the reason.
    Plans only: nothing changes."""
    budget[0] -= 1
    if budget[0] < 0:
        return Refusal("the scale would have to move through too many nodes")
    target = output_target(gm, node)
    if isinstance(target, Target):
        vec = match(target, state, usage)
        return vec if isinstance(vec, Refusal) else [(target, vec)]
    scaled = constant_mul_input(gm, node)
    if scaled is not None:  # a constant mul left in place (another site) commutes with this scale
        if promotes(gm, node, scaled):
            return Refusal(f"`{node.name}` multiplies by a constant of another dtype (the scale would round in "
                           "the other dtype)")
        inputs: list[tuple[fx.Node, ScaleState]] = [(scaled, state)]
    elif is_add(node):
        inputs = [(a, state) for a in node.args]  # type: ignore[misc]
    else:
        cat = cat_pieces(gm, node, state.position)
        if isinstance(cat, Refusal):
            return Refusal(f"`{node.name}` is {cat.reason}")
        if isinstance(cat, tuple):
            pieces, sizes = cat
            if sizes is not None and state.values.dim() and sum(sizes) != state.values.numel():
                return Refusal(f"`{node.name}` is a cat whose pieces' sizes do not add up to the scale's "
                               f"{state.values.numel()}")
            if sizes is None:
                inputs = [(p, state) for p in pieces]
            else:
                parts = state.values.split(sizes)
                inputs = [(p, ScaleState(v, state.position)) for p, v in zip(pieces, parts, strict=True)]
        else:
            moved = map_through(gm, node, state, forward=False)
            if isinstance(moved, Refusal):
                return moved
            if not isinstance(moved, ScaleState):
                return Refusal(f"the value comes from `{node.name}`, which is not a layer that can take a scale")
            if not isinstance(node.args[0], fx.Node):
                return Refusal(f"`{node.name}` has no graph input")
            inputs = [(node.args[0], moved)]
    if len({id(n) for n, _ in inputs}) != len(inputs):
        return Refusal(f"`{node.name}` uses the same value twice")
    plan: Plan = []
    for child, child_state in inputs:
        others = other_users(child, node)
        if others:
            return Refusal(f"`{child.name}` has {len(others)} other user(s); folding there would change them")
        found = plan_backward(gm, child, child_state, usage, budget)
        if isinstance(found, Refusal):
            return found
        plan += found
    return plan


def plan_fold(gm: fx.GraphModule, mul: fx.Node, x: fx.Node, c: torch.Tensor, usage: TensorUsage,
              order: dict[fx.Node, int]) -> MulFold | Refusal:
    """The plan that folds ``mul = x * c`` back into ``x``'s producer(s), or why there is none
    (nothing changes)."""
    state = per_channel_scale(c, mul, x)
    if isinstance(state, Refusal):
        return state
    written = written_scale(gm, mul, x)
    if written:
        return written
    others = other_users(x, mul)
    if others and (not is_inplace(gm, mul) or any(order.get(u, 0) < order[mul] for u in others)):
        return Refusal(f"`{x.name}` has {len(others)} other user(s); folding into it would change them")
    aliased = erase_refusal(gm, mul, x, order)
    if aliased is not None:
        return aliased
    with torch.no_grad():
        plan = plan_backward(gm, x, state, usage, [64])
    if isinstance(plan, Refusal):
        return plan
    return plan_refusal(c, plan) or MulFold(mul, x, plan)


def fold_scales(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    """Fold every per-channel constant ``mul`` into the layer(s) that produced its other operand.

    Modifies ``gm`` in place; returns it with one :class:`FoldRecord` per constant ``mul`` seen (a
    pipeline pass: it reads nothing from ``context``). One
    pass over the graph; the parameter-usage table is built once (folds keep it valid, since the
    tensors they create are used once and are not in it).
    """
    usage = TensorUsage(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    records: list[FoldRecord] = []
    for mul in list(gm.graph.nodes):
        operands = constant_operand(gm, mul)
        if operands is None:
            continue
        x, c = operands
        name, site = mul.name, site_of(mul)
        target = str(x.target) if x.op == "call_module" else x.name
        from_attention = _computed(mul, x)
        fold = plan_fold(gm, mul, x, c, usage, order)
        if isinstance(fold, Refusal):
            records.append(FoldRecord(name, site, target, LEFT_AS_MUL, fold.reason, from_attention))
        else:
            apply_fold(gm, fold)
            records.append(FoldRecord(name, site, target, plan_kinds(fold.plan), "", from_attention,
                                      plan_labels(fold.plan)))
    gm.recompile()
    return PassResult(gm, tuple(records))
