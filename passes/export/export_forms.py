"""Export forms: a GraphModule's calls rewritten into forms torch's ONNX exporter takes, for export only.

``F.scaled_dot_product_attention`` trips torch's dynamo ONNX exporter in two ways that its eager
result does not: inputs of rank 5 or 3 (timm Twins' grouped attention; SAM's ViT, heads folded into
the batch: "only 4D query, key, and value are supported"), and an output whose layout the exporter's
decomposition assumes differently from the trace, so a later ``reshape`` is recorded as a ``view`` it
cannot do (timm BEiT: "Cannot view a tensor with shape ... as a tensor with shape ..."). Each call
becomes a call of :func:`attention_4d`: leading dimensions flattened into one batch dimension (where
the mask, if any, has at most the last two dimensions, so it broadcasts the same way), or a leading
dimension of 1 added to rank-3 inputs (and a rank-3 mask); the attention computed on rank-4 tensors,
the result reshaped back and copied into a contiguous tensor (a ``clone``: the exporter drops
``.contiguous()`` of a tensor its trace takes for contiguous already).

A module that holds GraphModules (a partially captured model) is shallow-copied with the rewritten parts
in their places (timm NesT, captured in parts).

Equivalence: the same values up to float rounding (attention is computed independently per leading
index, but one rank-4 batch may be blocked differently by the kernel; the clone and the reshapes copy
values only); the export's verification in onnxruntime checks the file against the model. The result
shares the model's submodules, parameters and buffers (a new graph, nothing copied); the model passed
in is not changed.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_ATTENTION = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def attention_4d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 *args: object, **kwargs: object) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on rank-4 tensors, the result contiguous (see the module docstring)."""
    if query.dim() == 3 and key.dim() == 3 and value.dim() == 3:  # (batch * heads, tokens, dim): SAM's ViT
        mask = attn_mask.unsqueeze(0) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
        out = F.scaled_dot_product_attention(query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), mask,
                                             *args, **kwargs)
        return out.squeeze(0).clone(memory_format=torch.contiguous_format)
    lead = query.shape[:-3]
    mask_broadcasts = attn_mask is None or attn_mask.dim() <= 2
    if query.dim() > 4 and key.shape[:-3] == lead and value.shape[:-3] == lead and mask_broadcasts:
        out = F.scaled_dot_product_attention(query.flatten(0, query.dim() - 4), key.flatten(0, key.dim() - 4),
                                             value.flatten(0, value.dim() - 4), attn_mask, *args, **kwargs)
        return out.unflatten(0, lead).clone(memory_format=torch.contiguous_format)
    return F.scaled_dot_product_attention(query, key, value, attn_mask, *args, **kwargs).clone(
        memory_format=torch.contiguous_format)


def for_export(model: nn.Module) -> nn.Module:
    """``model`` with every attention call of its GraphModules in the form of :func:`attention_4d`.

    A GraphModule is rewritten on a new graph; a module that holds GraphModules (a partially captured
    model: the library's class with captured parts) is shallow-copied with the rewritten parts in their
    places. ``model`` itself is returned when nothing needs rewriting; it is never changed."""
    if isinstance(model, fx.GraphModule):
        return _rewritten(model)
    changed = {}
    for name, child in model._modules.items():
        if child is not None:
            exported = for_export(child)
            if exported is not child:
                changed[name] = exported
    if not changed:
        return model
    clone = copy.copy(model)
    clone._modules = {**model._modules, **changed}
    return clone


def _rewritten(gm: fx.GraphModule) -> fx.GraphModule:
    if not any(n.op == "call_function" and n.target in _ATTENTION for n in gm.graph.nodes):
        return gm
    graph = _copied(gm.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _ATTENTION:
            node.target = attention_4d
    rewritten = fx.GraphModule(gm, graph, type(gm).__name__)
    rewritten.meta.update(gm.meta)
    rewritten.train(gm.training)
    return rewritten


def _copied(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new
