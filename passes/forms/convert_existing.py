"""Convert existing channel attention into its ASR form: ``x * act(F(pool(x)))`` -> ``x * act(F(psi))``.

For each :class:`ChannelAttention` (found by :func:`find_channel_attention`) the attention network
``F`` (the nodes between the pooling and the gate, with the very modules and parameters the model
trained) is moved into an :class:`~asr_fx.passes.forms.asr_blocks.ASR` block registered at ``asr.<key>``, where ``key``
is the attention module's path with dots as underscores (``features.1.block.1`` ->
``features_1_block_1``); inside the block ``F`` keeps its local names (``attention.fc1``, ...).
The block is fed by a learnable ``psi`` of the pooled tensor's shape with batch 1, and applies the
same gate (``sigmoid`` or ``hardsigmoid``). The old pooling, network, gate and multiply leave the
graph, and their now unused submodules leave the model.

Equivalence: none by design (the attention stops depending on the input; this is the fine-tuning
start point the paper's "ASR(k)" implies). With ``psi`` set to the batch mean of the pooled values
on calibration inputs the block outputs, for every input, the attention the old block gave the
*average* pooled descriptor of those inputs; without calibration inputs ``psi`` starts at a
constant (the paper's 0.1), and the first fine-tuning steps move it.

Refuses: an attention whose channel count or pooled shape is unknown (run shape propagation, i.e.
pass ``example_inputs``), and two attentions with the same key. Modifies ``gm`` in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from asr_fx.errors import InputShapeError, InvalidOptionError, UnknownSiteError

from .asr_blocks import ASR
from ..placement.attention_patterns import ChannelAttention, find_channel_attention, pooled_dims
from ..graph.graph_queries import fetch_attr, module_of, output_shape, qualified_key
from ..placement.locate import Site
from ..graph.modes import preserved_training_modes


def _psi_shape(gm: fx.GraphModule, att: ChannelAttention, pool: fx.Node) -> tuple[int, ...]:
    shape = output_shape(pool)
    if shape is not None:
        return (1, *shape[1:])
    if att.channels <= 0:
        raise InputShapeError(f"the channel count of the attention at `{att.module or att.mul}` is unknown: "
                              "pass example_inputs= so shapes can be propagated", shape=None)
    keeps_dims = module_of(gm, pool) is not None or pool.op == "call_function" and "pool" in str(pool.target) or \
        bool(pool.kwargs.get("keepdim", pool.args[2] if len(pool.args) > 2 else False))
    return (1, att.channels, *([1] * att.spatial_dims)) if keeps_dims else (1, att.channels)


def _local(target: str, prefix: str) -> str:
    return target[len(prefix) + 1:] if prefix and target.startswith(prefix + ".") else target


def attention_network(gm: fx.GraphModule, att: ChannelAttention, psi_shape: tuple[int, ...]) -> fx.GraphModule:
    """``F`` of one attention as a GraphModule ``psi -> F(psi)`` (the gate's input), sharing its modules."""
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    psi = graph.placeholder("psi")
    # the pooled value becomes psi; queries of x's shape become queries of psi's (batch 1, C channels)
    env: dict[fx.Node, fx.Node] = {nodes[p]: psi for p in att.pools}
    env[nodes[att.feature]] = psi
    owners: dict[str, object] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for name in sorted((*att.shape_queries, *att.network), key=lambda n: order[nodes[n]]):
        node = nodes[name]
        copy = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            local = _local(str(node.target), att.module)
            owners[local] = gm.get_submodule(str(node.target)) if node.op == "call_module" else \
                fetch_attr(gm, str(node.target))
            copy.target = local
        env[node] = copy
    gate = nodes[att.gate]
    graph.output(env[nodes[att.gate_input]] if att.gate_input else env[gate.args[0]])
    net = fx.GraphModule(owners, graph, "AttentionNetwork")
    net.psi_shape = psi_shape
    return net


def pooled_means(gm: fx.GraphModule, attentions: Sequence[ChannelAttention],
                 example_inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{pool node: batch mean of its output}`` over ``example_inputs`` (eval mode, no grad)."""
    wanted = {p for att in attentions for p in att.pools}
    seen: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            out = super().run_node(n)
            if n.name in wanted and isinstance(out, torch.Tensor):
                seen[n.name] = out.detach().mean(0, keepdim=True)
            return out

    with preserved_training_modes(gm), torch.no_grad():
        Recorder(gm.eval()).run(*example_inputs)
    return seen


def convert_existing_attention(
    gm: fx.GraphModule,
    attentions: Sequence[ChannelAttention],
    *,
    psi_init: float = 0.1,
    psi_values: dict[str, torch.Tensor] | None = None,
    learnable_psi: bool = True,
    container: str = "asr",
) -> list[str]:
    """Replace each attention with an ASR block fed by ``psi``; returns the blocks' keys.

    ``psi_values`` (``{pool node name: tensor}``, e.g. from :func:`pooled_means`) sets ``psi``;
    attentions without one start at the constant ``psi_init``.
    """
    if not hasattr(gm, container):
        gm.add_module(container, nn.ModuleDict())
    blocks = getattr(gm, container)
    keys: list[str] = []
    for att in attentions:
        nodes = {n.name: n for n in gm.graph.nodes}
        mul, pool, feature = nodes[att.mul], nodes[att.pool], nodes[att.feature]
        if any(pooled_dims(gm, nodes[p]) is None for p in att.pools):
            raise UnknownSiteError(f"`{att.pool}` is not a global pooling; the graph changed since the attention was found")
        key = qualified_key(att.module) if att.module else att.mul
        if key in blocks:
            raise InvalidOptionError(f"two blocks share the key {key!r}: the attention at `{att.module}` and a site")
        shape = _psi_shape(gm, att, pool)
        net = attention_network(gm, att, shape)
        channels = att.channels or int(torch.tensor(shape).prod())
        block = ASR(channels, net, channel_pos=att.channel_pos, activation=att.activation, psi_init=psi_init,
                    learnable_psi=learnable_psi)
        if psi_values and att.pool in psi_values:
            with torch.no_grad():
                block.psi.copy_(psi_values[att.pool].reshape(shape))
        blocks[key] = block
        with gm.graph.inserting_before(mul):
            new = gm.graph.call_module(f"{container}.{key}", (feature,))
        mul.replace_all_uses_with(new)
        _erase_unused(gm, att)
        keys.append(key)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return keys


def _erase_unused(gm: fx.GraphModule, att: ChannelAttention) -> None:
    """Erase the old attention's nodes (multiply, gate-side views, gate, network, pools) once unused."""
    nodes = {n.name: n for n in gm.graph.nodes}
    doomed = {nodes[att.mul], nodes[att.gate], *(nodes[n] for n in att.network), *(nodes[p] for p in att.pools),
              *(nodes[n] for n in att.shape_queries), *(nodes[n] for n in att.gate_nodes)}
    node = next(a for a in nodes[att.mul].all_input_nodes if a.name != att.feature)
    while node is not nodes[att.gate] and node.args and isinstance(node.args[0], fx.Node):
        doomed.add(node)
        node = node.args[0]
    changed = True
    while changed:
        changed = False
        for node in list(doomed):
            if not node.users:
                gm.graph.erase_node(node)
                doomed.discard(node)
                changed = True


def existing_attention_sites(gm: fx.GraphModule) -> list[Site]:
    """The model's own channel attention as :class:`Site` records (``rule="existing"``, ``node`` = the
    multiply), for listings: after conversion ``x * v`` folds forward into the layer that reads ``x``
    (its input channels) or back into the layer that produced ``x``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for att in find_channel_attention(gm):
        users = list(nodes[att.mul].users)
        reader = users[0] if len(users) == 1 and users[0].op == "call_module" else None
        if reader is not None and isinstance(module_of(gm, reader), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            target = f"{reader.target} (input channels)"
        else:
            feature = nodes[att.feature]
            target = str(feature.target) if feature.op == "call_module" else feature.name
        out.append(Site(att.mul, att.module, "existing", att.channels, att.channel_pos, target,
                        foldable=att.channels > 0,
                        reason="" if att.channels > 0 else "channel count unknown: pass example_inputs"))
    return out
