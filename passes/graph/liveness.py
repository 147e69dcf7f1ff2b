"""Which nodes of a graph matter: the live set that dead-code removal keeps, with writes into storage.

torch.fx's own dead-code elimination keeps a node only when a later node reads its *result*. A write
into storage is read through other values: ``x.sub_(m).div_(s)`` whose result nobody uses still changes
``x``; ``o = h; h = drop(h); h.mul_(s)`` changes ``o`` too (Dropout and Identity in eval return their
input itself); a wrapped helper ``_add_shortcut(x, q)`` that writes ``x[:, :, 1:] += q`` and returns a
value nobody reads changes ``x``. This module computes *storage classes* (values linked by views,
in-place ops, identity modules and opaque calls, which may return or keep their argument) and keeps every
write into a class that holds a live value, a model input (the caller may read it after the call) or a
parameter or buffer (module state, read by the next call).

A *write* is an in-place op (``mul_``, ``inplace=True``, ``a += b``, ``a[i] = b``, ``copy_``) into its
first argument, or an opaque call (a function or module that is not torch's own: it may write into any
of its tensor arguments). Equivalence: the kept graph computes every output and every state change the
given graph computes.
"""

from __future__ import annotations

import builtins
import math
import operator

import torch.fx as fx

from .aliases import is_view
from .graph_queries import is_inplace
from .op_tables import IDENTITY_MODULES

_PURE_MODULE_ROOTS = ("torch", "operator", "builtins", "math", "_operator")


def is_opaque_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call whose body the graph does not show and that is not torch's own: a wrapped helper
    function, or a leaf module of a class defined outside torch (it may write into its arguments)."""
    if node.op == "call_function":
        target = node.target
        if target in (getattr, builtins.len, builtins.isinstance) or getattr(target, "__module__", None) is None:
            return False
        root = str(getattr(target, "__module__", "")).split(".")[0]
        return root not in _PURE_MODULE_ROOTS and target not in vars(math).values() and \
            target not in vars(operator).values()
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return not type(module).__module__.startswith("torch.")
    return False


def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), IDENTITY_MODULES)


class StorageClasses:
    """Union-find over a graph's nodes: two values are in one class when they may share storage."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}
        self.writes: list[tuple[fx.Node, list[fx.Node]]] = []
        attrs: dict[str, fx.Node] = {}
        for node in gm.graph.nodes:
            self.parent[node] = node
            if node.op == "get_attr":  # every read of one attribute is one storage
                self._union(node, attrs.setdefault(str(node.target), node))
            tensors = [a for a in node.all_input_nodes]
            first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if first is not None and (is_inplace(gm, node) or is_view(gm, node) or _is_identity(gm, node)):
                self._union(node, first)
                if is_inplace(gm, node):
                    self.writes.append((node, [first]))
            elif is_opaque_call(gm, node) and tensors:
                for arg in tensors:
                    self._union(node, arg)
                self.writes.append((node, tensors))

    def find(self, node: fx.Node) -> fx.Node:
        while self.parent[node] is not node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[ra] = rb

    def written(self, node: fx.Node) -> bool:
        """Whether some node writes into ``node``'s storage."""
        root = self.find(node)
        return any(self.find(t) is root for _, targets in self.writes for t in targets)


def live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Every node the outputs, the side effects or the state changes of ``gm`` depend on."""
    classes = StorageClasses(gm)
    writes_into: dict[fx.Node, list[fx.Node]] = {}
    for write, targets in classes.writes:
        for t in targets:
            writes_into.setdefault(classes.find(t), []).append(write)
    live: set[fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op in ("output", "placeholder") or n.is_impure()]
    # a write into a model input or into module state outlives the call
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            stack += writes_into.get(classes.find(node), [])
    seen_classes: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
        root = classes.find(node)
        if root not in seen_classes:
            seen_classes.add(root)
            stack.extend(writes_into.get(root, []))
    return live


def remove_dead_nodes(gm: fx.GraphModule) -> bool:
    """Erase every node that is not live (:func:`live_nodes`); whether any went."""
    live = live_nodes(gm)
    changed = False
    for node in reversed(list(gm.graph.nodes)):
        if node not in live and not node.users:
            gm.graph.erase_node(node)
            changed = True
    return changed


__all__ = ["StorageClasses", "is_opaque_call", "live_nodes", "remove_dead_nodes"]
