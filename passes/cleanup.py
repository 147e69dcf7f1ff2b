"""Pass 8 (housekeeping): drop dead nodes, then the submodules, parameters and buffers that no
node uses any more. Equivalence: exact (only unreachable code and state are removed).
Modifies ``gm`` in place and returns it."""

from __future__ import annotations

import torch.fx as fx

from .constant_fold import FOLDED_PREFIX


def eliminate_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove dead nodes, unused submodules and unused folded-constant buffers."""
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [b for b in gm._buffers if b.startswith(FOLDED_PREFIX) and b not in used]:
        del gm._buffers[name]
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
