"""Insert pass: put a module at each site, as ``x -> block(x)`` right after the site's node.

Equivalence: none by design (this is the training-time change); the graph is otherwise untouched.
Each block is registered as ``<container>.<site.node>`` (e.g. ``asr.layer1_0_bn3``), so submodule
and state_dict names are derived from the site and stable across runs.

Refuses: a site naming a node that is not in the graph (:class:`~asr_fx.errors.UnknownSiteError`), two
sites at the same node, and a container name the model already uses for something else
(:class:`~asr_fx.errors.InvalidOptionError`).
Modifies ``gm`` in place and returns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.fx as fx
from torch import nn

from asr_fx.errors import InvalidOptionError, UnknownSiteError

from ..placement.locate import Site


def insert_asr(
    gm: fx.GraphModule,
    sites: Sequence[Site],
    make_block: Callable[[Site], nn.Module],
    container: str = "asr",
) -> fx.GraphModule:
    """Insert ``make_block(site)`` after every site's node; all former users of the node see the block's output."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if hasattr(gm, container) and not isinstance(getattr(gm, container), nn.ModuleDict):
        raise InvalidOptionError(f"the model already has an attribute {container!r}; choose another container name")
    if not hasattr(gm, container):
        gm.add_module(container, nn.ModuleDict())
    blocks: nn.ModuleDict = getattr(gm, container)
    for site in sites:
        if site.node not in nodes:
            raise UnknownSiteError(f"site node {site.node!r} is not in the graph")
        if site.node in blocks:
            raise InvalidOptionError(f"two sites share the node {site.node!r}; each site takes one block")
        blocks[site.node] = make_block(site)
        node = nodes[site.node]
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(f"{container}.{site.node}", (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    gm.graph.lint()
    gm.recompile()
    return gm
