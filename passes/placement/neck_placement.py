"""Placement outside the paper's blocks: plain stretches and feature-pyramid necks (used by ``auto``).

A mixed model (a detector or segmenter: a residual backbone, then a neck, decoder or head) has layers
that belong to no residual block. The paper places ASR "post the individual layers ... subsequent to
batch normalization and prior to the integration of residual connections and ReLU ... calibration for
the outputs of each stratum" (Appendix B.2). Read as structure:

- **Plain stretches** (:func:`plain_stretch_nodes`): the nodes outside every residual block that a
  paper rule placed (residual, transformer or inverted-residual), from the first such block on in the
  dataflow. Their norm -> activation pairs get the ``norm-act`` site, as in the paper's VGG and
  MobileNet: CSP transitions and necks (YOLO), decoders (smp Unet, DeepLabV3+), heads (FCN). The
  **stem** (the first block's start and everything it is computed from) is left out: the paper's
  ResNets have no ASR on their stem conv-bn-relu, and the authors' code has none there. So a ResNet,
  RegNet, ConvNeXt, ViT, Swin, MaxViT or 3-D ResNet gets exactly its paper sites: none has a norm ->
  activation pair past the stem outside its blocks. A model with no residual block (VGG, DenseNet,
  ShuffleNetV2's concatenation branches) or whose residual blocks are all inverted residuals
  (MobileNetV2/V3, EfficientNet, MNASNet: ``norm-act`` everywhere already) is not affected. Of the
  torchvision classifiers only EfficientNetV2 changes (v2_s: 62 -> 71 sites): its FusedMBConv blocks
  (no depthwise conv) take the ``residual`` site, and the blocks that have no residual add (the first of
  each stage) and the head conv, which had no site at all, now get ``norm-act`` like its MBConv blocks.
  Counting from the first block rather than from the first layer keeps the stem out in every mixed
  model alike (YOLO's first two convs and first C2f's ``cv1``, a ResNet encoder's stem in smp).
- **Necks** (:func:`find_neck_sites`): convs without norm or activation whose outputs are summed
  into one feature map that goes on to another layer, as a feature pyramid's top-down path does
  (torchvision's ``FeaturePyramidNetwork``, smp's FPN decoder): ``lateral(c4) + upsample(p5)``, then a
  3x3 output conv. A *merge* is an add, not a placed residual block's, whose operands come (through
  upsampling, identity and dropout) from a layer with no norm or activation after it, or from another
  merge, and whose sum reaches another layer through those same ops and adds only (not through an
  activation: a RepVGG/ACNet branch sum followed by a ReLU is not a neck). The ``neck`` sites are the
  layers feeding a merge (the lateral convs, and the top level's conv feeding the top-down path) and
  the convs without norm or activation that read a merge or a neck site (the output convs, which give
  the pyramid levels). A prediction conv (LR-ASPP's two classifiers summed into the logits, a
  segmentation or detection head's last conv) reaches no further layer, so it is never a site.

Each scale sits on a conv/norm output and folds into that layer exactly (conv: weight rows and bias).
Both are report passes: they change no graph.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..graph.graph_queries import calls_one_of, is_add, module_of
from .locate import ResidualBlock, Site, is_activation, site_at
from ..graph.op_tables import IDENTITY_MODULES, NORM_MODULES, UPSAMPLE_FUNCTIONS, UPSAMPLE_MODULES

#: layers whose output can take a neck's scale
_NECK_LAYERS = (_ConvNd, *NORM_MODULES)
#: layers a neck's features go on to
_LAYERS = (_ConvNd, nn.Linear, *NORM_MODULES)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it is computed from."""
    seen, stack = {node}, [node]
    while stack:
        for p in stack.pop().all_input_nodes:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def plain_stretch_nodes(gm: fx.GraphModule, placed: list[ResidualBlock]) -> set[fx.Node]:
    """The nodes outside every block in ``placed`` (the residual blocks a paper rule placed), without
    the stem: the first placed block's start (in graph order of the adds) and its ancestors.
    Empty when nothing was placed."""
    if not placed:
        return set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(placed, key=lambda b: order[b.add])
    inside = _ancestors(first.start).union(*(b.nodes for b in placed))
    return {n for n in gm.graph.nodes if n not in inside}


def _passes_value(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Upsampling, identity or dropout: a per-channel feature map goes through with its channels."""
    return calls_one_of(gm, node, (*UPSAMPLE_MODULES, *IDENTITY_MODULES), UPSAMPLE_FUNCTIONS, ()) and \
        bool(node.args) and isinstance(node.args[0], fx.Node)


def _source(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Back from ``node`` over upsampling, identity and dropout."""
    while _passes_value(gm, node):
        node = node.args[0]
    return node


def _is_linear_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A conv or norm call none of whose users is a norm or an activation (those are ``norm-act``'s)."""
    return isinstance(module_of(gm, node), _NECK_LAYERS) and not any(
        is_activation(gm, u) or isinstance(module_of(gm, u), NORM_MODULES) for u in node.users)


def _reaches_layer(gm: fx.GraphModule, node: fx.Node, limit: int = 64) -> bool:
    """Whether ``node``'s value reaches a conv/norm/linear layer through upsampling, identity and adds only."""
    seen, stack = {node}, [node]
    while stack and len(seen) <= limit:
        for user in stack.pop().users:
            if isinstance(module_of(gm, user), _LAYERS):
                return True
            if user not in seen and (_passes_value(gm, user) or is_add(user)):
                seen.add(user)
                stack.append(user)
    return False


def find_neck_sites(gm: fx.GraphModule, outside: Iterable[fx.Node] | None = None,
                    excluded: set[str] | None = None, placed_adds: set[fx.Node] | None = None) -> list[Site]:
    """Sites of the ``neck`` rule (see the module docstring), in graph order.

    ``outside``: the nodes that may be sites (default: all); ``excluded``: node names that may not
    (an existing attention's network); ``placed_adds``: residual adds a paper rule placed (never a merge).
    """
    allowed = set(gm.graph.nodes) if outside is None else set(outside)
    excluded, placed_adds = excluded or set(), placed_adds or set()

    def candidate(node: fx.Node) -> bool:
        return node in allowed and node.name not in excluded and _is_linear_layer(gm, node)

    merges: set[fx.Node] = set()
    chosen: list[fx.Node] = []
    for node in gm.graph.nodes:
        if is_add(node) and node not in placed_adds:
            sources = [_source(gm, a) for a in node.args]
            if all(candidate(s) or s in merges for s in sources) and _reaches_layer(gm, node):
                merges.add(node)
                chosen += [s for s in sources if s not in merges]
    neck = set(chosen)
    for node in gm.graph.nodes:  # output convs read a merge or a neck layer
        if isinstance(module_of(gm, node), _ConvNd) and candidate(node) and node.args and \
                isinstance(node.args[0], fx.Node) and _source(gm, node.args[0]) in (merges | neck):
            neck.add(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = (site_at(gm, n, "neck") for n in sorted(neck, key=order.__getitem__))
    return [s for s in sites if s is not None]


__all__ = ["find_neck_sites", "plain_stretch_nodes"]
