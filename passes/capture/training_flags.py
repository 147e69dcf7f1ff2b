"""Capture step: every read of ``self.training`` in a traced forward keeps following ``train()``/``eval()``.

Symbolic tracing evaluates ``self.training`` to a Python bool, so a graph traced in one mode would
compute that mode for ever (BatchNorm inside a composite layer kept on batch statistics after
``.eval()``, dropout kept dropping). The model is therefore traced twice, once in train mode and once
in eval mode, and the two graphs are compared node by node:

- equal graphs whose only differences are boolean arguments (``F.dropout(x, p, training)``, a
  functional BatchNorm's ``training``) -> each such argument becomes a read of the GraphModule's
  ``training`` flag (or its negation): exact in both modes;
- ... or numbers of one type (Hugging Face attention's ``dropout=0.0 if not self.training else p``) -> each
  becomes :func:`mode_value` of the flag and the two values: each mode computes its own trace's graph;
- graphs that differ in any other way (Python control flow on ``self.training``: drop-path's
  ``if not self.training: return x``, a train-only branch) -> :func:`mode_dependent_module` names the
  innermost module whose forward branches; the caller keeps it as one opaque call (its own forward then
  reads ``self.training``) and traces again.

Refuses: a difference at the top level of the model (its own forward branches on ``self.training``),
which no leaf can contain: :class:`asr_fx.errors.TraceError` names the model and the node.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from asr_fx.errors import TraceError

from ..graph.graph_queries import fetch_attr


class ModeDifference(Exception):
    """The train and eval graphs differ at ``train_node`` / ``eval_node`` beyond a boolean argument."""

    def __init__(self, train_node: fx.Node | None, eval_node: fx.Node | None) -> None:
        super().__init__(f"{train_node} / {eval_node}")
        self.train_node = train_node
        self.eval_node = eval_node


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    """What a ``get_attr`` node reads, or ``None`` where ``gm`` has no such attribute."""
    try:
        return fetch_attr(gm, target)
    except AttributeError:
        return None


def _same_target(a: fx.Node, b: fx.Node, gm_a: fx.GraphModule, gm_b: fx.GraphModule) -> bool:
    if a.op != b.op:
        return False
    if a.target == b.target:
        return True
    if a.op != "get_attr":
        return False
    # tensor constants are named by trace order (``_tensor_constant0`` / ``_tensor_constant5``): compare values
    x, y = _fetch(gm_a, str(a.target)), _fetch(gm_b, str(b.target))
    return x is y or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                      and x.dtype == y.dtype and bool(torch.equal(x, y)))


def mode_value(training: bool, train_value: Any, eval_value: Any) -> Any:
    """``train_value`` in train mode, ``eval_value`` in eval mode (a number the forward picks by mode)."""
    return train_value if training else eval_value


def _compare_args(a: fx.Node, b: fx.Node, pairs: dict[fx.Node, fx.Node]) -> list[tuple[int, Any]]:
    """Positions (in the flattened ``(args, kwargs)``) of arguments that differ: (index, train value) for
    booleans, (index, (train value, eval value)) for numbers of one type (int or float)."""
    leaves_a, spec_a = _flatten((a.args, a.kwargs))
    leaves_b, spec_b = _flatten((b.args, b.kwargs))
    if spec_a != spec_b:
        raise ModeDifference(a, b)
    flags: list[tuple[int, Any]] = []
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b)):
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node) and pairs.get(x) is y):
                raise ModeDifference(a, b)
        elif isinstance(x, bool) and isinstance(y, bool) and x != y:
            flags.append((i, x))
        elif type(x) is type(y) and type(x) in (int, float) and x != y:
            flags.append((i, (x, y)))
        elif type(x) is not type(y) or not _equal(x, y):
            raise ModeDifference(a, b)
    return flags


def _flatten(value: Any) -> tuple[list[Any], Any]:
    """The leaves of nested tuples/lists/dicts/slices in order, and the nesting with leaves as ``0``."""
    leaves: list[Any] = []

    def keep(leaf: Any) -> int:
        leaves.append(leaf)
        return 0

    return leaves, map_aggregate(value, keep)


def _replace_leaf(value: Any, index: int, new: Any) -> Any:
    count = iter(range(1 << 30))
    return map_aggregate(value, lambda leaf: new if next(count) == index else leaf)


def _equal(x: Any, y: Any) -> bool:
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 - values without a plain == (tensors): compare identity
        return x is y


def align(train_gm: fx.GraphModule, eval_gm: fx.GraphModule) -> list[tuple[fx.Node, int, Any]]:
    """The arguments of ``train_gm``'s graph that follow the mode: (node, flat index, train value) for
    booleans, (node, flat index, (train value, eval value)) for numbers.

    Raises :class:`ModeDifference` at the first pair of nodes that differ otherwise.
    """
    train_nodes, eval_nodes = list(train_gm.graph.nodes), list(eval_gm.graph.nodes)
    pairs: dict[fx.Node, fx.Node] = {}
    flags = []
    for i in range(max(len(train_nodes), len(eval_nodes))):
        a = train_nodes[i] if i < len(train_nodes) else None
        b = eval_nodes[i] if i < len(eval_nodes) else None
        if a is None or b is None or not _same_target(a, b, train_gm, eval_gm):
            raise ModeDifference(a, b)
        flags += [(a, index, value) for index, value in _compare_args(a, b, pairs)]
        pairs[a] = b
    return flags


def bind_mode_flags(gm: fx.GraphModule, flags: list[tuple[fx.Node, int, Any]]) -> int:
    """Replace each mode-dependent boolean argument by a read of ``gm.training`` (negated where the
    train-mode value was ``False``), each mode-dependent number by :func:`mode_value` of it; returns how
    many were bound. Modifies ``gm`` in place."""
    if not flags:
        return 0
    graph = gm.graph
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bool attribute, not a parameter, buffer or module: fine for get_attr
        flag = graph.get_attr("training")
        negated = None
    for node, index, value in flags:
        if isinstance(value, tuple):
            with graph.inserting_before(node):
                picked = graph.call_function(mode_value, (flag, *value))
            node.args, node.kwargs = _replace_leaf((node.args, node.kwargs), index, picked)
            continue
        if not value and negated is None:
            with graph.inserting_after(flag):
                negated = graph.call_function(operator.not_, (flag,))
        node.args, node.kwargs = _replace_leaf((node.args, node.kwargs), index, flag if value else negated)
    gm.recompile()
    return len(flags)


def _stack(node: fx.Node | None) -> list[str]:
    if node is None:
        return []
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


def mode_dependent_module(diff: ModeDifference, already: set[str], model_name: str) -> str:
    """The module path to keep as a leaf so that the train and eval graphs agree at ``diff``.

    The outermost module present on one side only (the branch the other mode skipped), else the
    innermost module both sides are in. Raises :class:`TraceError` when that is the model itself.
    """
    train_stack, eval_stack = _stack(diff.train_node), _stack(diff.eval_node)
    only = [p for p in train_stack if p not in eval_stack] or [p for p in eval_stack if p not in train_stack]
    common = [p for p in train_stack if p in eval_stack]
    candidates = only[:1] + list(reversed(common))
    for path in candidates:
        if path and path not in already:
            return path
    node = diff.train_node or diff.eval_node
    raise TraceError(
        f"the forward of {model_name} computes a different graph in train and in eval mode (it branches on "
        f"self.training at node `{node}`), so no one traced graph can follow train()/eval(). Way out: "
        "move the mode-dependent part into a submodule (kept as one call), or trace the model in the mode "
        "you will run it in with asr_fx.passes.trace(..., bind_training=False)."
    )
