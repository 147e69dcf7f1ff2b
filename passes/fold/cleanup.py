"""Cleanup pass (housekeeping): drop dead nodes, then the submodules, parameters and buffers that no
node uses any more (a folded layer scale, the attention networks whose value became a constant).

Equivalence: exact (only unreachable code and state are removed). Linear in the size of the
graph and the module tree. Modifies ``gm`` in place and returns it (:func:`drop_dead_nodes`, a pipeline
pass, in a :class:`~asr_fx.passes.infra.PassResult`).
"""

from __future__ import annotations

import torch.fx as fx

from ..graph.liveness import remove_dead_nodes
from ..infra import PassContext, PassResult


def _used_state(gm: fx.GraphModule) -> tuple[set[str], set[str]]:
    """Module paths whose whole subtree is used (called leaves), and attribute paths read by ``get_attr``."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    return called, attrs


def remove_unused_state(gm: fx.GraphModule) -> fx.GraphModule:
    """Delete every parameter and buffer that no ``get_attr`` reads and no called module owns."""
    called, attrs = _used_state(gm)
    used_modules: set[int] = set()
    for path in called | attrs:
        try:
            obj = gm.get_submodule(path)
        except AttributeError:
            continue
        used_modules.update(id(m) for m in obj.modules())
    for path, module in list(gm.named_modules()):
        if id(module) in used_modules:
            continue
        prefix = f"{path}." if path else ""
        for store in (module._parameters, module._buffers):
            for name in [k for k in store if f"{prefix}{k}" not in attrs]:
                del store[name]
    return gm


def drop_dead_nodes(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    """Only the node part of :func:`eliminate_dead_code` (no recompile): unused values, e.g. the
    attention networks after constant folding, or a scale whose result nothing reads. Writes into
    storage that is read elsewhere, into model inputs or into module state stay
    (:func:`asr_fx.passes.graph.liveness.live_nodes`: in-place chains, identity modules, opaque calls).
    A pipeline pass: returns ``gm``, changed in place, without records."""
    remove_dead_nodes(gm)
    return PassResult(gm)


def eliminate_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove dead nodes (keeping writes into values that are read elsewhere, inputs and state), unused
    submodules and unused parameters and buffers."""
    drop_dead_nodes(gm)
    gm.delete_all_unused_submodules()
    remove_unused_state(gm)
    gm.graph.lint()
    gm.recompile()
    return gm
