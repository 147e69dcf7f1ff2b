"""The BN-affine training form of ASR blocks at BatchNorm sites (a pass pair), called ``bn_affine_form``
in the public API: a *training* form, not a fused model.

:func:`to_bn_affine_form`: ``bn(x) -> asr.k(.)`` becomes ``asr.k(x, bn)`` where ``asr.k`` is a
:class:`~asr_fx.passes.forms.asr_blocks.BatchNormAffineASR` computing BatchNorm with affine ``weight * v, bias * v``
(no ``bn(x)`` activation is kept for the backward of ``* v``).
:func:`from_bn_affine_form`: the inverse at fusion time, with ``v`` folded into the BN's affine
parameters, so the rest of :func:`asr_fx.fuse` sees a vanilla BN call.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .asr_blocks import ASR, BatchNormAffineASR, is_affine_batch_norm
from ..fold.check_finite import require_finite
from ..infra import PassResult
from ..graph.records import FoldRecord


def _module_calls(gm: fx.GraphModule) -> dict[str, int]:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def to_bn_affine_form(gm: fx.GraphModule, container: str = "asr") -> PassResult:
    """Turn every ASR block that directly follows an affine BatchNorm into its BN-affine form.

    Equivalence: ``asr.k(bn(x)) == asr.k'(x, bn)`` in training and eval (running statistics updated
    the same way); psi and the attention network are the same tensors, so state_dict keys do not change.
    Refuses (leaves as ordinary ``x * v`` blocks): blocks whose input is not a single-argument call of
    a plain affine ``nn.BatchNorm1d/2d/3d``, BNs called more than once or used by anything else, and
    ``nn.Sequential`` blocks (``delta > 1``). Modifies ``gm`` in place; changed when a block was converted.
    """
    calls = _module_calls(gm)
    converted = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith(f"{container}."):
            continue
        block = gm.get_submodule(node.target)
        if type(block) is not ASR or len(node.args) != 1 or node.kwargs:
            continue
        norm_node = node.args[0]
        if not isinstance(norm_node, fx.Node) or norm_node.op != "call_module" or len(norm_node.users) != 1:
            continue
        if len(norm_node.args) != 1 or norm_node.kwargs or calls.get(norm_node.target) != 1:
            continue
        if not is_affine_batch_norm(gm.get_submodule(norm_node.target)):
            continue
        key = str(node.target)[len(container) + 1:]
        getattr(gm, container)[key] = BatchNormAffineASR.from_block(block, str(norm_node.target))
        with gm.graph.inserting_before(node):
            norm_ref = gm.graph.get_attr(norm_node.target)
        node.args = (norm_node.args[0], norm_ref)
        gm.graph.erase_node(norm_node)
        converted.append(str(node.target))
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(converted))


def from_bn_affine_form(gm: fx.GraphModule) -> PassResult:
    """Replace every ``block(x, bn)`` call of a :class:`BatchNormAffineASR` by ``bn(x)`` with ``v`` folded into ``bn``.

    Equivalence: ``bn(x)`` afterwards equals ``block(x, bn)`` before (``bn`` gets new Parameters
    ``weight * v`` and ``bias * v``; the old tensors are not written, but ``bn`` itself is changed:
    meant for the private copy :func:`asr_fx.fuse` works on). The block is removed.
    Refuses a non-finite ``v`` (broken psi or attention weights) with :class:`~asr_fx.errors.ASRError`.
    Modifies ``gm`` in place; records one :class:`FoldRecord` per block (``where="bn"``, as the ordinary form's fold).
    """
    records = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        block = gm.get_submodule(node.target)
        if not isinstance(block, BatchNormAffineASR):
            continue
        x, norm_ref = node.args
        norm = gm.get_submodule(norm_ref.target)
        with torch.no_grad():
            v = block.attention_value().reshape(-1).to(norm.weight.dtype)
        require_finite(v, str(node.target))
        norm.weight = nn.Parameter(norm.weight.detach() * v, requires_grad=norm.weight.requires_grad)
        norm.bias = nn.Parameter(norm.bias.detach() * v, requires_grad=norm.bias.requires_grad)
        block_path = str(node.target)
        records.append(FoldRecord(mul=node.name, site=block_path, target=str(norm_ref.target), where="bn",
                                  reason="BN-affine block", from_attention=True, into=str(norm_ref.target)))
        node.target, node.args = norm_ref.target, (x,)
        gm.graph.erase_node(norm_ref)
        gm.delete_submodule(block_path)
        container = block_path.rpartition(".")[0]
        if container and not len(gm.get_submodule(container)._modules):
            gm.delete_submodule(container)
    if records:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(records), tuple(records))
