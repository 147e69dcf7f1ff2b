"""Constant-folding pass: every value computed only from parameters, buffers and literals
becomes one buffer.

Equivalence: exact in eval mode (the folded subgraph is evaluated once with the module's current
parameters); this is what makes ``act(F(psi))`` a constant ``v`` whether ASR was inserted by
:func:`asr_fx.instrument` or written by hand.

Refuses (leaves in the graph): tensors the forward writes into (``self.s.copy_(g)``),
random ops, values that are not tensors, and a lone ``get_attr``
(already a constant). Call it on a model in eval mode: a module in training mode (BatchNorm
updating running statistics, dropout) is not a constant function of its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from ..graph.graph_queries import fetch_attr, is_mul
from ..graph.op_tables import ADAPTER_METHODS, RANDOM_FUNCTIONS, RANDOM_METHODS
from .fold_guards import written_attributes
from .scale_spellings import is_scale_spelling

FOLDED_PREFIX = "_folded_"


def _is_constant_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target not in RANDOM_FUNCTIONS
    if node.op == "call_method":
        return node.target not in RANDOM_METHODS
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return not module.training
    return False


def _evaluate(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "get_attr":
        return fetch_attr(gm, str(node.target))
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, str(node.target))(*rest, **kwargs)
    return gm.get_submodule(str(node.target))(*args, **kwargs)


def _feeds_mul(node: fx.Node) -> bool:
    """``node`` is a multiply, or ``c.expand_as(x)`` / ``c.type_as(x)`` / ``c.to(x.dtype)`` feeding one
    (``x * c.expand_as(x)``, as SE code writes it)."""
    if is_mul(node) or is_scale_spelling(node):  # x / c, addcmul, einsum: made multiplies after this pass
        return True
    return node.op == "call_method" and node.target in ADAPTER_METHODS and \
        any(is_mul(u) for u in node.users)


def fold_constants(gm: fx.GraphModule, *, scales_only: bool = True) -> fx.GraphModule:
    """Replace each maximal parameter-only tensor subgraph by a ``get_attr`` of a new buffer.

    With ``scales_only`` (the default, what :func:`asr_fx.fuse` uses) only subgraphs whose value
    is multiplied into the graph (an ASR attention value, a reshaped layer scale) are folded; other
    parameter-only computations (e.g. Swin's relative position bias) stay, so the parameter count
    and the exported op set stay the vanilla model's. The buffer is named ``_folded_<node name>``.
    Modifies ``gm`` in place and returns it; dead nodes are left for :func:`eliminate_dead_code`.
    """
    constant: dict[fx.Node, bool] = {}
    written = written_attributes(gm)  # a buffer the forward writes into is no constant
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant[node] = str(node.target) not in written
        elif node.op in ("placeholder", "output"):
            constant[node] = False
        else:
            constant[node] = _is_constant_op(gm, node) and all(constant[i] for i in node.all_input_nodes)

    env: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in list(gm.graph.nodes):
            if not constant[node]:
                continue
            env[node] = _evaluate(gm, node, env)
            if node.op == "get_attr" or not isinstance(env[node], torch.Tensor):
                continue
            if all(constant[user] for user in node.users):
                continue
            if scales_only and not any(_feeds_mul(user) for user in node.users if not constant[user]):
                continue
            name = FOLDED_PREFIX + node.name
            gm.register_buffer(name, env[node].detach().clone())
            with gm.graph.inserting_before(node):
                replacement = gm.graph.get_attr(name)
            replacement.meta = dict(node.meta)
            node.replace_all_uses_with(replacement, delete_user_cb=lambda u: not constant[u])
            constant[replacement] = True
    gm.recompile()
    return gm


def holds_folded(state: Mapping[str, torch.Tensor], value: torch.Tensor) -> bool:
    """``state`` (a folded graph's state_dict) holds a ``_folded_*`` constant with ``value``'s values, in any
    shape (``res_scale.view(-1, 1, 1)`` folded): the graph still computes with that value itself."""
    flat = value.detach().flatten().cpu()
    return any(key.rpartition(".")[2].startswith(FOLDED_PREFIX) and t.numel() == flat.numel()
               and torch.equal(t.detach().flatten().cpu(), flat) for key, t in state.items())


__all__ = ["FOLDED_PREFIX", "fold_constants", "holds_folded"]
