"""Pass 2, locate: find where ASR goes. Returns a report (a list of :class:`Site`); changes nothing.

The rule of this module is the paper's ResNet rule (Appendix B.2): after the last normalization of
each residual branch, before the residual add. A residual add is an ``add`` of two values whose
lowest common ancestor is reached by one input through more layers than the other; the longer path
is the residual branch, the shorter one the shortcut (identity or downsample).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch.fx as fx

from ._patterns import IDENTITY_MODULES, NORM_MODULES, channel_info, is_add, module_of


@dataclass
class Site:
    """One place where ``x * v`` goes, right after graph node ``node``.

    ``module``: the module path of the layer that produced ``x`` (empty for a functional op);
    ``key``: the stable name of the ASR block (``asr.<key>``); ``channels`` and ``channel_pos``
    (counted from the right) describe the scale's broadcast; ``fold_target``: the layer the scale
    folds into; ``foldable``/``reason``: whether that is expected to work.
    """

    node: str
    module: str
    rule: str
    channels: int
    channel_pos: int
    fold_target: str
    foldable: bool = True
    reason: str = ""

    @property
    def key(self) -> str:
        """The block's name: the node name, which torch.fx derives from the module path
        (``layer1.0.bn3`` -> ``layer1_0_bn3``; a second call of it -> ``layer1_0_bn3_1``)."""
        return self.node

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _walk_back_identity(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Skip modules that are the identity at inference (dropout, identity)."""
    while isinstance(module_of(gm, node), IDENTITY_MODULES) and len(node.users) == 1:
        node = node.args[0]  # type: ignore[assignment]
    return node


def branch_depths(a: fx.Node, b: fx.Node, limit: int = 10_000) -> tuple[int, int] | None:
    """Path lengths from ``a`` and ``b`` back to their nearest common ancestor.

    Breadth-first from both sides at once, so the cost is the size of the block, not of the graph.
    Returns ``None`` where no common ancestor exists within ``limit`` steps.
    """
    dist = ({a: 0}, {b: 0})
    frontier: tuple[list[fx.Node], list[fx.Node]] = ([a], [b])
    for _ in range(limit):
        for side in (0, 1):
            meet = [n for n in frontier[side] if n in dist[1 - side]]
            if meet:
                n = min(meet, key=lambda m: dist[0][m] + dist[1][m])
                return dist[0][n], dist[1][n]
        if not frontier[0] and not frontier[1]:
            return None
        side = 0 if (frontier[0] and (not frontier[1] or len(dist[0]) <= len(dist[1]))) else 1
        nxt: list[fx.Node] = []
        for n in frontier[side]:
            for p in n.all_input_nodes:
                if p not in dist[side]:
                    dist[side][p] = dist[side][n] + 1
                    nxt.append(p)
        frontier = (nxt, frontier[1]) if side == 0 else (frontier[0], nxt)
    return None


def find_residual_sites(gm: fx.GraphModule) -> list[Site]:
    """Sites of the ``residual`` rule: the last norm (or conv) of each residual branch."""
    sites: list[Site] = []
    seen: set[fx.Node] = set()
    for add in gm.graph.nodes:
        if not is_add(add):
            continue
        lhs, rhs = add.args
        depths = branch_depths(lhs, rhs)
        if depths is None or depths[0] == depths[1]:
            continue
        branch = lhs if depths[0] > depths[1] else rhs
        producer = _walk_back_identity(gm, branch)
        module = module_of(gm, producer)
        info = channel_info(gm, producer)
        if info is None or producer in seen:
            continue
        if isinstance(module, NORM_MODULES) or module is not None and info is not None:
            seen.add(producer)
            sites.append(_site(producer, "residual", info))
    return sites


def _site(node: fx.Node, rule: str, info: Any) -> Site:
    module = str(node.target) if node.op == "call_module" else ""
    foldable = info.position is not None
    return Site(
        node=node.name,
        module=module,
        rule=rule,
        channels=info.channels,
        channel_pos=info.position if info.position is not None else 0,
        fold_target=module or node.name,
        foldable=foldable,
        reason="" if foldable else "channel dimension unknown: pass example_inputs",
    )
