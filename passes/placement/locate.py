"""Locate: find where ASR goes. Returns a report (a list of :class:`Site`); changes nothing.

This module holds the site record, what may be a site (:func:`site_at`), the walk from a branch's
end back to the layer that can take the scale (:func:`branch_producer`), and the paper's ResNet
rule (Appendix B.2): after the last normalization of each residual branch, before the residual add.
The other rules (norm-act, branch, transformer, auto) and the registry of all rules are in
:mod:`asr_fx.passes.placement.rules`.

A residual add is an ``add`` of two values whose nearest common ancestor is reached by one input
through more nodes than the other; the longer path is the residual branch, the shorter one the
shortcut (identity or downsample). From the branch's end the walk skips what a per-channel scale
passes through unchanged or commutes with: dropout/identity, stochastic depth, a permute, and a
multiply ``x * s`` whose ``s`` is a scale of ``x`` by dataflow: computed from parameters only (a
layer scale, ConvNeXt) or from ``x`` itself (a channel attention gate, in either operand order,
whether or not its pattern is recognised); ``x`` is followed. The first layer that can take the
scale is the site.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch.fx as fx

from ..graph.graph_queries import calls_one_of, is_add, module_of, mul_operands, reads_only_metadata, skip_identity
from ..graph.op_tables import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    DROPOUT_FUNCTION_NAMES,
    IDENTITY_MODULES,
    NORM_MODULES,
    PERMUTE_TARGETS,
    TRANSPOSE_TARGETS,
)
from ..layers.base import TensorUsage
from ..layers.parallel_branches import parallel_sums
from ..layers.registry import layer_at, shared_layer_refusal
from .attention_patterns import find_channel_attention
from .context_add import is_pooled_context
from .spelled_activations import function_activation_input, spelled_activation_input


def activation_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of the pointwise activation (ReLU family, Hardswish, SiLU, GELU, ...) ``node`` computes, as a
    module, function or method, spelled out (``x * sigmoid(x)``) or as an autograd Function
    (:mod:`asr_fx.passes.placement.spelled_activations`); ``None`` if ``node`` is none."""
    if calls_one_of(gm, node, ACTIVATION_MODULES, ACTIVATION_FUNCTIONS, ACTIVATION_METHODS):
        return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op != "call_function":
        return None
    return spelled_activation_input(node) or function_activation_input(node)


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A pointwise activation (ReLU family, Hardswish, SiLU, GELU, ...): see :func:`activation_input`."""
    return activation_input(gm, node) is not None


def norm_before_activation(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The norm ``n`` when ``node`` is ``act(n(...))`` (identity steps between allowed), else ``None``."""
    x = activation_input(gm, node)
    if x is None:
        return None
    inner = skip_identity(gm, x)
    return inner if isinstance(module_of(gm, inner), NORM_MODULES) else None


@dataclass
class Site:
    """One place where ``x * v`` goes, right after graph node ``node``.

    ``node`` also names the ASR block (``asr.<node>``): torch.fx derives it from the module path
    (``layer1.0.bn3`` -> ``layer1_0_bn3``; a second call of it -> ``layer1_0_bn3_1``), so it is stable.
    ``module``: the module path of the layer that produced ``x`` (empty for a functional op);
    ``channels`` and ``channel_pos`` (counted from the right) describe the scale's broadcast; ``fold_target``: the
    layer the scale
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Site:
        """A site from :meth:`to_dict`'s dict; keys it does not know (an old ``key``) are ignored."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def site_at(gm: fx.GraphModule, node: fx.Node, rule: str) -> Site | None:
    """The site right after ``node`` when the layer registry (:func:`~asr_fx.passes.layers.registry.layer_at`)
    recognises a layer there that placement may put a site after, else ``None``.

    Layers: conv/norm/linear module calls, the attention output ``mha(...)[0]`` of an
    ``nn.MultiheadAttention`` (folds into ``out_proj``), a sum of parallel conv/norm branches (RepVGG,
    MobileOne, ACNet while training: its scale folds into the last layer of every branch), a
    weight-standardized conv with a gain (NF-Nets: folds into the gain), and torchvision's Swin
    attention, a site that cannot fold (``foldable=False`` with the rule's reason).
    """
    layer = layer_at(gm, node)
    if layer is None:
        return None
    return Site(node.name, layer.module, rule, layer.channels, layer.position if layer.position is not None else 0,
                layer.fold_target, foldable=layer.refusal is None,
                reason=layer.refusal.reason if layer.refusal is not None else "")


def without_shared_layers(gm: fx.GraphModule, sites: list[Site]) -> list[Site]:
    """``sites`` less those right after a layer that is called at another place too, or shares a
    parameter with another call or module (tied weights): the fold refuses to fold a scale on one call
    into such a layer, since that would change the other calls (the registry's
    :func:`~asr_fx.passes.layers.registry.shared_layer_refusal`)."""
    usage = TensorUsage(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    return [s for s in sites if s.node not in nodes or shared_layer_refusal(gm, nodes[s.node], usage) is None]


def _function_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _is_stochastic_depth(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Stochastic depth or functional dropout: the identity at inference."""
    module = module_of(gm, node)
    return (type(module).__name__ == "StochasticDepth" or _function_name(node) == "stochastic_depth"
            or node.op == "call_module" and str(node.target) in gm.meta.get("asr_fx.eval_identity", ())
            or node.op == "call_function" and _function_name(node) in DROPOUT_FUNCTION_NAMES)


def _is_permute(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in (*PERMUTE_TARGETS, *TRANSPOSE_TARGETS,
                                                                          "contiguous")


def _scale_kind(scale: fx.Node, x: fx.Node, limit: int) -> str | None:
    """``"gate"`` when ``scale`` is computed from ``x`` (and parameters), ``"constant"`` when from parameters
    only, else ``None`` (it reads another value, or its network is larger than ``limit`` nodes). The walk
    back stops at ``x``, so its cost is the size of the gate's network, not of the graph."""
    seen, stack, reads_x = {scale}, [scale], False
    while stack:
        node = stack.pop()
        if node is x:
            reads_x = True
            continue
        if node.op == "placeholder":
            return None
        for p in node.all_input_nodes:
            if p not in seen:
                seen.add(p)
                if len(seen) > limit:
                    return None
                stack.append(p)
    return "gate" if reads_x else "constant"


def _scaled_operand(node: fx.Node, limit: int = 64) -> fx.Node | None:
    """``x`` when ``node`` is ``x * s`` (either order) with ``s`` a scale of ``x``, else ``None``.

    By dataflow: ``s`` is computed from parameters only (a layer scale, an ASR block written by hand),
    or from ``x`` itself and parameters (a gate ``g(x)``: SE and any other channel attention, matched or
    not), or is a number (``x * 0.2``). The product is still the branch ``x`` is on, so the walk follows ``x``.
    """
    operands = mul_operands(node)
    if operands is None:
        return None
    a, b = operands
    for x, number in ((a, b), (b, a)):  # x * 0.2 (NF-Nets' alpha, a res-scale written as a number)
        if isinstance(x, fx.Node) and x.op != "get_attr" and isinstance(number, (int, float)) \
                and not isinstance(number, bool):
            return x
    if not all(isinstance(a, fx.Node) for a in operands):
        return None
    for x, scale in ((a, b), (b, a)):
        if x.op != "get_attr" and _scale_kind(scale, x, limit) is not None:
            return x
    return None


def branch_producer(gm: fx.GraphModule, node: fx.Node, attention_features: dict[str, str] | None = None,
                    limit: int = 16) -> fx.Node:
    """Walk back from a branch's end over steps a per-channel scale passes (see the module docstring).

    ``attention_features`` maps an existing attention's multiply node name to its scaled tensor's.
    Returns the first node that is none of those steps (maybe not a layer at all).
    """
    features = attention_features or {}
    nodes = {n.name: n for n in gm.graph.nodes} if features else {}
    for _ in range(limit):
        nxt: Any = None
        if isinstance(module_of(gm, node), IDENTITY_MODULES) or _is_stochastic_depth(gm, node) or _is_permute(node):
            nxt = node.args[0]
        elif node.name in features:
            nxt = nodes[features[node.name]]
        else:
            nxt = _scaled_operand(node)
        if not isinstance(nxt, fx.Node) or len(node.all_input_nodes) == 0:
            return node
        node = nxt
    return node


def _bfs_meet(a: fx.Node, b: fx.Node, limit: int = 10_000) -> tuple[int, int, fx.Node] | None:
    """Path lengths from ``a`` and ``b`` back to their nearest common ancestor, and that ancestor.

    Breadth-first from both sides at once, so the cost is the size of the block, not of the graph.
    Only data flows count: parameters, buffers and flags (``get_attr``) are no common ancestor.
    """
    dist: tuple[dict[fx.Node, int], dict[fx.Node, int]] = ({a: 0}, {b: 0})
    frontier: tuple[list[fx.Node], list[fx.Node]] = ([a], [b])
    for _ in range(limit):
        for side in (0, 1):
            meet = [n for n in frontier[side] if n in dist[1 - side]]
            if meet:
                n = min(meet, key=lambda m: dist[0][m] + dist[1][m])
                return dist[0][n], dist[1][n], n
        if not frontier[0] and not frontier[1]:
            return None
        side = 0 if (frontier[0] and (not frontier[1] or len(dist[0]) <= len(dist[1]))) else 1
        nxt: list[fx.Node] = []
        for n in frontier[side]:
            for p in n.all_input_nodes:
                if p not in dist[side] and p.op != "get_attr":
                    dist[side][p] = dist[side][n] + 1
                    nxt.append(p)
        frontier = (nxt, frontier[1]) if side == 0 else (frontier[0], nxt)
    return None


def branch_depths(a: fx.Node, b: fx.Node, limit: int = 10_000) -> tuple[int, int] | None:
    """Path lengths from ``a`` and ``b`` back to their nearest common ancestor (``None``: none)."""
    found = _bfs_meet(a, b, limit)
    return None if found is None else found[:2]


@dataclass
class ResidualBlock:
    """One residual add: ``add = branch + shortcut``; ``start`` is where both split, ``nodes`` the
    branch's nodes (``start`` excluded), ``producer`` the branch's last node before the scale-passing steps."""

    add: fx.Node
    branch: fx.Node
    shortcut: fx.Node
    start: fx.Node
    producer: fx.Node
    nodes: list[fx.Node]


def _branch_nodes(end: fx.Node, start: fx.Node, limit: int = 400) -> list[fx.Node] | None:
    """The nodes from ``end`` back to (not including) ``start``; ``None`` if the branch reads the graph
    input on another path or is larger than ``limit``. Another input of the graph than its first (an
    attention mask) is a side input of the branch, not another path; so is a read of a value's metadata
    (``x.shape``, ``x.device``, ``x.size()``: a mask built to the sizes of an earlier layer's output reads
    no values), whose input is not followed."""
    seen, stack = {start}, [end]
    out: list[fx.Node] = []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            if node is next(iter(node.graph.nodes)):
                return None
            continue
        if len(out) > limit:
            return None
        out.append(node)
        if not reads_only_metadata(node):
            stack.extend(node.all_input_nodes)
    return out


def residual_blocks(gm: fx.GraphModule, attention_features: dict[str, str] | None = None) -> list[ResidualBlock]:
    """Every residual add of ``gm`` whose branch is longer than its shortcut, in graph order.

    A sum of parallel conv/norm branches of one input (RepVGG, MobileOne, ACNet while training) is one
    block whose branch ends in the sum (:mod:`asr_fx.passes.layers.parallel_branches`): its adds are not residual
    adds of one branch and a shortcut (a shorter branch is no shortcut)."""
    blocks = []
    sums = {s.node: s for s in parallel_sums(gm)}
    inside = {a for s in sums.values() for a in s.adds}
    for add in gm.graph.nodes:
        if add in sums:
            s = sums[add]
            blocks.append(ResidualBlock(add, add, add, s.start, add, s.nodes))
            continue
        if not is_add(add) or add in inside:
            continue
        lhs, rhs = add.args
        found = _bfs_meet(lhs, rhs)
        if found is None or found[0] == found[1]:
            continue
        branch, shortcut = (lhs, rhs) if found[0] > found[1] else (rhs, lhs)
        if is_pooled_context(gm, branch, found[2]):
            continue  # x + mlp(pool(x)): a broadcast global context (GC/GE blocks), not a residual branch
        nodes = _branch_nodes(branch, found[2])
        if nodes is None:
            continue
        producer = branch_producer(gm, branch, attention_features)
        blocks.append(ResidualBlock(add, branch, shortcut, found[2], producer, nodes))
    return blocks


def residual_site(gm: fx.GraphModule, block: ResidualBlock, rule: str = "residual") -> Site | None:
    """The site of one residual block: its producer, or the norm before it when the branch ends in
    ``act(norm(...))`` (post-activation branches: the scale goes between the norm and its activation)."""
    site = site_at(gm, block.producer, rule)
    if site is None:
        norm = norm_before_activation(gm, block.producer)
        site = site_at(gm, norm, rule) if norm is not None else None
    return site


def attention_features(gm: fx.GraphModule) -> dict[str, str]:
    """Existing channel attention of ``gm`` as ``{multiply node: scaled tensor node}``."""
    return {a.mul: a.feature for a in find_channel_attention(gm)}


def find_residual_sites(gm: fx.GraphModule) -> list[Site]:
    """Sites of the ``residual`` rule: the last layer that can take a scale in each residual branch
    (the last norm in ResNet/RegNet/MobileNet blocks, also behind an SE block; the last linear in
    ConvNeXt blocks, before layer scale and stochastic depth)."""
    sites: list[Site] = []
    seen: set[str] = set()
    for block in residual_blocks(gm, attention_features(gm)):
        site = residual_site(gm, block)
        if site is not None and site.node not in seen:
            seen.add(site.node)
            sites.append(site)
    return sites
