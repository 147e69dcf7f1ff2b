"""Placement rules: the registry of every rule (:data:`PLACEMENT_RULES`), and the rules beyond
``residual``: ``norm-act``, ``branch``, ``transformer`` and ``auto``.

Each rule is a report pass ``GraphModule -> list[Site]`` (graph order); none changes the graph.
The paper's placements (Appendix B.2):

- ``residual`` (:func:`asr_fx.passes.placement.locate.find_residual_sites`): after the last norm of a residual
  branch, before the add (ResNet, RegNet; ConvNeXt: after the branch's last linear, before layer
  scale and stochastic depth; behind an existing SE block: after the norm the SE scales).
- ``norm-act``: between every norm and its activation (VGG, RepVGG, MobileNet: the depthwise and
  the pointwise layers); a conv followed directly by an activation (VGG without BN) counts too.
  Linear layers (classifier heads) are not sites of this rule.
- ``branch``: after the last norm of each branch that feeds a concatenation, before its activation
  (ShuffleNetV2).
- ``transformer``: after multi-head attention and after the MLP, before each residual add, on the
  feature (last) dimension (ViT, Swin, MaxViT's attention blocks).
- ``neck``: a feature pyramid's norm-free lateral and output convs (:mod:`asr_fx.passes.placement.neck_placement`).
- ``auto``: per block, from the graph's structure (see :func:`find_auto_sites`).

Layers inside an existing channel attention's network (an SE block's ``fc1 -> ReLU``) are never sites.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..graph.graph_queries import module_of, skip_identity
from ..graph.op_tables import NORM_MODULES
from ..layers.multihead_attention import mha_of
from ..layers.transposed_linear import is_transposed_linear
from ..layers.window_attention import window_attention_of
from .attention_patterns import find_channel_attention
from .locate import (
    ResidualBlock,
    Site,
    activation_input,
    find_residual_sites,
    norm_before_activation,
    residual_blocks,
    residual_site,
    site_at,
    without_shared_layers,
)
from .neck_placement import find_neck_sites, plain_stretch_nodes


def _attention_network_nodes(gm: fx.GraphModule) -> set[str]:
    return {name for att in find_channel_attention(gm) for name in att.network}


def _in_graph_order(gm: fx.GraphModule, sites: Iterable[Site]) -> list[Site]:
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    unique = {s.node: s for s in sites}
    return sorted(unique.values(), key=lambda s: order[s.node])


def _norm_act_sites(gm: fx.GraphModule, within: set[fx.Node] | None, excluded: set[str]) -> list[Site]:
    sites = []
    for act in gm.graph.nodes:
        x = activation_input(gm, act)
        if x is None:
            continue
        layer = skip_identity(gm, x)
        if layer.name in excluded or (within is not None and layer not in within):
            continue
        if isinstance(module_of(gm, layer), (*NORM_MODULES, _ConvNd)):
            site = site_at(gm, layer, "norm-act")
            if site is not None:
                sites.append(site)
    return _in_graph_order(gm, sites)


def find_norm_act_sites(gm: fx.GraphModule) -> list[Site]:
    """Sites of the ``norm-act`` rule: every norm (or norm-less conv) whose output feeds an activation."""
    return _norm_act_sites(gm, None, _attention_network_nodes(gm))


def _is_depthwise(module: nn.Module | None) -> bool:
    return isinstance(module, _ConvNd) and module.groups > 1 and module.groups == module.in_channels


def _chain(node: fx.Node, limit: int = 12) -> list[fx.Node]:
    """``node`` and the nodes before it along first arguments (a branch of a sequential block)."""
    out = [node]
    while len(out) < limit and node.args and isinstance(node.args[0], fx.Node) and len(node.args[0].users) == 1:
        node = node.args[0]
        out.append(node)
    return out


def _concat_branch_sites(gm: fx.GraphModule, need_depthwise: bool) -> list[Site]:
    sites = []
    for cat in gm.graph.nodes:
        if cat.op != "call_function" or cat.target is not torch.cat or not isinstance(cat.args[0], (list, tuple)):
            continue
        for end in cat.args[0]:
            if not isinstance(end, fx.Node):
                continue
            end = skip_identity(gm, end)
            norm = norm_before_activation(gm, end) or (end if isinstance(module_of(gm, end), NORM_MODULES) else None)
            if norm is None:
                continue
            if need_depthwise and not any(_is_depthwise(module_of(gm, n)) for n in _chain(norm)):
                continue
            site = site_at(gm, norm, "branch")
            if site is not None:
                sites.append(site)
    return _in_graph_order(gm, sites)


def find_branch_sites(gm: fx.GraphModule) -> list[Site]:
    """Sites of the ``branch`` rule: the last norm of every branch feeding a concatenation."""
    return _concat_branch_sites(gm, need_depthwise=False)


def _is_linear(module: nn.Module | None) -> bool:
    """``nn.Linear``, or transformers' transposed linear ``Conv1D`` (GPT-2)."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def _transformer_site(gm: fx.GraphModule, block: ResidualBlock) -> Site | None:
    producer = block.producer
    if mha_of(gm, producer) is not None or window_attention_of(gm, producer) is not None:
        return site_at(gm, producer, "transformer")
    conv_free = not any(isinstance(module_of(gm, n), _ConvNd) for n in block.nodes)
    tokens = any(_is_linear(module_of(gm, n)) or window_attention_of(gm, n) is not None for n in block.nodes)
    # pre-norm blocks end in the MLP's linear; post-norm blocks (Swin V2) in a LayerNorm after attention or MLP
    if conv_free and tokens and (_is_linear(module_of(gm, producer)) or isinstance(module_of(gm, producer),
                                                                                    NORM_MODULES)):
        return site_at(gm, producer, "transformer")
    return None


def find_transformer_sites(gm: fx.GraphModule) -> list[Site]:
    """Sites of the ``transformer`` rule: after each attention and each MLP, before its residual add.

    Swin's window attention is listed with ``foldable=False`` (see :func:`locate.site_at`)."""
    blocks = residual_blocks(gm, {a.mul: a.feature for a in find_channel_attention(gm)})
    return _in_graph_order(gm, filter(None, (_transformer_site(gm, b) for b in blocks)))


def _is_inverted_residual(gm: fx.GraphModule, block: ResidualBlock) -> bool:
    """A MobileNet-style block: a depthwise conv and at least one norm -> activation in the branch."""
    return any(_is_depthwise(module_of(gm, n)) for n in block.nodes) and any(
        norm_before_activation(gm, n) is not None for n in block.nodes
    )


def find_auto_sites(gm: fx.GraphModule) -> list[Site]:
    """The ``auto`` rule: the paper's placement per block, read from the graph's structure.

    - a residual block whose branch ends in attention, or in a linear or norm layer of a conv-free
      branch of linear layers: ``transformer`` (ViT, Swin, Swin V2's post-norm, MaxViT attention);
    - a residual block with a depthwise conv and norm -> activation pairs (MobileNetV2/V3,
      EfficientNet, MNASNet, MaxViT's MBConv): ``norm-act`` inside the branch;
    - any other residual block: ``residual`` (ResNet, ResNeXt, Wide ResNet, RegNet, ConvNeXt);
    - a concatenation of branches with depthwise convs: ``branch`` (ShuffleNetV2);
    - a model with none of the residual, transformer or branch blocks above (VGG, AlexNet,
      SqueezeNet, MobileNet, EfficientNet, MNASNet, DenseNet, GoogLeNet, Inception): ``norm-act``
      everywhere;
    - in a model with such residual blocks, the layers outside them past the stem (necks, decoders,
      heads, CSP transitions: :func:`~asr_fx.passes.placement.neck_placement.plain_stretch_nodes`): ``norm-act``.
      The stem keeps no site, as in the paper's ResNets; so the torchvision classifiers keep their
      paper sites exactly (none has a norm -> activation pair outside its blocks past the stem);
    - anywhere: a feature pyramid's norm-free lateral and output convs: ``neck``
      (:func:`~asr_fx.passes.placement.neck_placement.find_neck_sites`).

    Sites that cannot fold (Swin's window attention; a layer called at several places or with tied
    weights, e.g. a conv position encoding shared by the blocks) are left out: ``auto`` promises a model
    that fuses back to the vanilla structure; the other rules list them.
    """
    excluded = _attention_network_nodes(gm)
    sites: list[Site] = []
    inverted: set[fx.Node] = set()
    placed = _placed_blocks(gm)
    structured = False
    for block, site in placed:
        if site is None:  # an inverted residual: norm-act inside it
            inverted.update(block.nodes)
            continue
        structured = True
        if site.foldable:
            sites.append(site)
    branch = _concat_branch_sites(gm, need_depthwise=True)
    structured = structured or bool(branch)
    sites += branch
    blocks = [block for block, _ in placed]
    plain = plain_stretch_nodes(gm, blocks) if structured else None
    sites += _norm_act_sites(gm, inverted | plain if plain is not None else None, excluded)
    taken = {s.node for s in sites}
    sites += [s for s in _neck_sites(gm, blocks, excluded) if s.node not in taken]
    return _in_graph_order(gm, without_shared_layers(gm, sites))


def _placed_blocks(gm: fx.GraphModule) -> list[tuple[ResidualBlock, Site | None]]:
    """The residual blocks a paper rule places, each with its ``transformer``/``residual`` site, or
    ``None`` for an inverted residual (whose norm -> activation pairs are the sites), in graph order."""
    features = {a.mul: a.feature for a in find_channel_attention(gm)}
    placed: list[tuple[ResidualBlock, Site | None]] = []
    for block in residual_blocks(gm, features):
        site = _transformer_site(gm, block)
        if site is None and _is_inverted_residual(gm, block):
            placed.append((block, None))
            continue
        site = site or residual_site(gm, block)
        if site is not None:
            placed.append((block, site))
    return placed


def _neck_sites(gm: fx.GraphModule, blocks: list[ResidualBlock], excluded: set[str]) -> list[Site]:
    """``neck`` sites outside the placed residual ``blocks``, whose adds are no merges."""
    inside = set().union(*(b.nodes for b in blocks))
    return find_neck_sites(gm, (n for n in gm.graph.nodes if n not in inside), excluded, {b.add for b in blocks})


def _find_neck_sites(gm: fx.GraphModule) -> list[Site]:
    """Sites of the ``neck`` rule alone (see :mod:`asr_fx.passes.placement.neck_placement`)."""
    return _neck_sites(gm, [block for block, _ in _placed_blocks(gm)], _attention_network_nodes(gm))


@dataclass(frozen=True)
class PlacementRule:
    """One placement rule: its ``name``, other names it answers to (``aliases``), the ``find``
    function ``GraphModule -> list[Site]``, and what it ``looks_for`` (as "no site found" says it)."""

    name: str
    find: Callable[[fx.GraphModule], list[Site]]
    looks_for: str
    aliases: tuple[str, ...] = ()


_RESIDUAL = PlacementRule(
    "residual", find_residual_sites,
    "residual adds whose longer branch ends (past dropout, stochastic depth, layer scale, permutes and existing "
    "channel attention) in a conv/norm/linear layer, a norm before an activation, or a multi-head attention",
    aliases=("resnet",))
_NORM_ACT = PlacementRule(
    "norm-act", find_norm_act_sites,
    "norm layers (BatchNorm/GroupNorm/InstanceNorm/LayerNorm), or convs without a norm, whose output goes into an "
    "activation (ReLU, ReLU6, Hardswish, SiLU, GELU, ...)",
    aliases=("norm_act",))
_BRANCH = PlacementRule(
    "branch", find_branch_sites,
    "concatenations (torch.cat) whose inputs end in a norm layer, maybe followed by an activation",
    aliases=("shufflenet",))
_TRANSFORMER = PlacementRule(
    "transformer", find_transformer_sites,
    "residual adds whose branch ends in nn.MultiheadAttention, Swin window attention, or the last linear layer of a "
    "conv-free MLP",
    aliases=("vit",))
_NECK = PlacementRule(
    "neck", _find_neck_sites,
    "convs (or norms) without a norm or activation after them whose outputs are summed, maybe upsampled, into a "
    "feature map that goes on to another layer (a feature pyramid's lateral convs), and convs without a norm or "
    "activation that read such a sum (its output convs)",
    aliases=("fpn",))
_AUTO = PlacementRule(
    "auto", find_auto_sites,
    "any of: " + "; ".join(f"{r.name}: {r.looks_for}" for r in (_RESIDUAL, _NORM_ACT, _BRANCH, _TRANSFORMER, _NECK)))

#: every placement rule by name (the one registry: ``instrument``, ``find_sites`` and the CLI read it)
PLACEMENT_RULES: dict[str, PlacementRule] = {
    r.name: r for r in (_AUTO, _RESIDUAL, _NORM_ACT, _BRANCH, _TRANSFORMER, _NECK)}
#: other names of the rules: ``{alias: rule name}``
RULE_ALIASES: dict[str, str] = {alias: r.name for r in PLACEMENT_RULES.values() for alias in r.aliases}


def placement_rule(name: str) -> PlacementRule | None:
    """The rule called ``name`` (or one of its aliases), else ``None``."""
    return PLACEMENT_RULES.get(RULE_ALIASES.get(name, name))


def rule_names() -> list[str]:
    """Every name a rule answers to, sorted (for "choose one of" messages)."""
    return sorted({*PLACEMENT_RULES, *RULE_ALIASES})


__all__ = ["PLACEMENT_RULES", "PlacementRule", "RULE_ALIASES", "find_auto_sites", "find_branch_sites",
           "find_norm_act_sites", "find_transformer_sites", "placement_rule", "rule_names"]
