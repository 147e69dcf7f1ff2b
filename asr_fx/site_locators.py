"""Sites of a whole model's graph named in the graph of one of its parts.

When a site has no place in the model's modules (functional code), the child module that holds it is
captured alone (:func:`asr_fx.partial_capture.in_parts`), and its trace must get the very sites the
whole model's placement chose. Node names differ between the two traces (torch.fx counts names per
graph), so a site is located by what does not change: a module's output by the module's path; a value
of functional code by its innermost enclosing module ``E`` and ``(op, target, k)``: it is the ``k``-th
node with that op and target among the nodes traced inside ``E``. The same Python traced twice gives
the same sequence, so the ``k``-th is the same node; where a locator finds no node, the part gets no
name for it and the caller's count check refuses the parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from asr_fx.passes import Site, trace


@dataclass(frozen=True)
class Locator:
    """Where one site is: ``module`` (its output) or ``(enclosing, op, target, k)`` (functional code)."""

    module: str = ""
    enclosing: str = ""
    op: str = ""
    target: Any = None
    k: int = 0


def _stack(node: fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _inside(node: fx.Node, enclosing: str) -> bool:
    return not enclosing or enclosing in _stack(node)


def locate(gm: fx.GraphModule, sites: Sequence[Site]) -> list[Locator]:
    """One :class:`Locator` per site of ``gm`` (the whole model's trace)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    found = []
    for site in sites:
        node = nodes[site.node]
        if site.module:  # a module's output (or MHA's first output, a standardized conv's): named by the module
            found.append(Locator(module=site.module))
            continue
        stack = _stack(node)
        enclosing = stack[-1] if stack else ""
        same = [n for n in gm.graph.nodes if n.op == node.op and n.target == node.target and _inside(n, enclosing)]
        found.append(Locator(enclosing=enclosing, op=node.op, target=node.target, k=same.index(node)))
    return found


class Locators(list):
    """The locators of a model's sites, as ``instrument``'s ``sites=`` for its parts (see the module docstring)."""

    def names(self, path: str, child: nn.Module, inputs: tuple[Any, ...] | None, leaf_modules: Any) -> list[str] | None:
        """The names, in the trace of the child at ``path``, of the sites inside it; ``None`` when one of
        them cannot be found there."""
        prefix = f"{path}."
        mine = [loc for loc in self if (loc.module or loc.enclosing).startswith(prefix) or
                (not loc.module and loc.enclosing == path)]
        names = [loc.module[len(prefix):] for loc in mine if loc.module]
        functional = [loc for loc in mine if not loc.module]
        if not functional:
            return names
        try:
            gm = trace(child, leaf_modules, example_inputs=inputs)
        except Exception:  # noqa: BLE001 - no names: the caller refuses the parts
            return None
        for loc in functional:
            enclosing = loc.enclosing[len(prefix):] if loc.enclosing != path else ""
            same = [n for n in gm.graph.nodes if n.op == loc.op and n.target == loc.target and _inside(n, enclosing)]
            if loc.k >= len(same):
                return None
            names.append(same[loc.k].name)
        return names

    def outside_children(self) -> bool:
        """Some site is functional code of the root's own forward (no child holds it)."""
        return any(not loc.module and not loc.enclosing for loc in self)
