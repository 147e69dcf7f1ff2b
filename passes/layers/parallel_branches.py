"""Sums of parallel layer branches: the training-time form of structural re-parameterization blocks.

RepVGG, MobileOne and ACNet train a block as a sum of parallel branches that all read one input and
each end in a conv or norm layer: ``bn_3x3(conv_3x3(x)) + bn_1x1(conv_1x1(x)) + bn(x)``, written as a
chain of adds (``out += branch(x)`` too). A sum that starts from a literal (MobileOne's ``scale_out +
identity_out`` with ``identity_out = 0`` where the identity branch is absent) is not recognised: the fold
passes do not move a scale through ``x + 0``, so a site there could not fold. After training they merge into one conv, so the sum is one layer: a per-channel scale after
the sum is the same scale after the last layer of every branch, and folds into each of them. It is not
a residual add (its operands are branches of one block, not a branch and a shortcut).

This module only reads the graph (:func:`parallel_sum`, :func:`parallel_sums`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from ..graph.graph_queries import ChannelInfo, channel_info, is_add, module_of, reads_only_metadata
from ..graph.op_tables import IDENTITY_MODULES


@dataclass
class ParallelSum:
    """``node`` sums the outputs ``terms`` of parallel conv/norm branches that all start at ``start``;
    ``adds``: the add nodes of the sum (``node`` included), ``nodes``: every node of the block."""

    node: fx.Node
    terms: list[fx.Node]
    start: fx.Node
    adds: list[fx.Node]
    nodes: list[fx.Node]
    info: ChannelInfo


def _data_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not reads_only_metadata(u) and
            not (u.op == "call_function" and u.target is getattr)]


def _plus_zero(node: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` is ``x + 0`` (either order), else ``None``."""
    if node.op != "call_function" or node.target not in (operator.add, operator.iadd) or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and not isinstance(b, fx.Node) and b == 0:
        return a
    if isinstance(b, fx.Node) and not isinstance(a, fx.Node) and a == 0:
        return b
    return None


def _skip(gm: fx.GraphModule, node: fx.Node, seen: list[fx.Node]) -> fx.Node:
    """Back over identity modules (a norm-act layer's identity activation, dropout) with one data user."""
    while isinstance(module_of(gm, node), IDENTITY_MODULES) and isinstance(node.args[0], fx.Node) \
            and len(_data_users(node.args[0])) == 1:
        seen.append(node)
        node = node.args[0]
    return node


def _branch_start(gm: fx.GraphModule, term: fx.Node, seen: list[fx.Node]) -> fx.Node:
    """Back from a branch's last layer over a chain of conv/norm layers (each read only by the next)."""
    node = term
    while channel_info(gm, node) is not None and isinstance(node.args[0], fx.Node):
        seen.append(node)
        previous = _skip(gm, node.args[0], seen)
        if channel_info(gm, previous) is None or len(_data_users(previous)) != 1:
            return previous
        node = previous
    return node


def parallel_sum(gm: fx.GraphModule, node: fx.Node) -> ParallelSum | None:
    """``node`` as a sum of two or more parallel conv/norm branches of one input, else ``None``.

    Every term (past identity modules) is a conv/norm layer call with the same channel layout; each
    intermediate value of the sum is read only by the next step; every branch, walked back over a chain
    of conv/norm layers, starts at the same node (a branch may be a lone norm of that input)."""
    if not is_add(node):
        return None
    terms: list[fx.Node] = []
    adds: list[fx.Node] = []
    seen: list[fx.Node] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if current is not node and len(_data_users(current)) != 1:
            return None
        current = _skip(gm, current, seen)
        if _plus_zero(current) is not None:
            return None
        if is_add(current):
            adds.append(current)
            stack.extend(current.args)  # type: ignore[arg-type]
        else:
            terms.append(current)
    if len(terms) < 2:
        return None
    infos = [channel_info(gm, t) for t in terms]
    if any(i is None or (i.channels, i.position) != (infos[0].channels, infos[0].position) for i in infos):
        return None
    starts = {_branch_start(gm, t, seen) for t in terms}
    if len(starts) != 1:
        return None
    start = starts.pop()
    return ParallelSum(node, terms, start, adds, [*adds, *seen], infos[0])  # type: ignore[arg-type]


def parallel_sums(gm: fx.GraphModule) -> list[ParallelSum]:
    """The outermost sums of parallel branches of ``gm``, in graph order (an add inside a larger sum is
    part of that sum)."""
    found = [s for s in (parallel_sum(gm, n) for n in gm.graph.nodes) if s is not None]
    inner = {a for s in found for a in s.adds if a is not s.node}
    return [s for s in found if s.node not in inner]
