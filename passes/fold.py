"""Pass 5, fold: ``mul(layer(x), c)`` with ``c`` a per-channel constant becomes ``layer'(x)``.

Equivalence: ``layer'(x) == layer(x) * c`` for every input, by the formulas of
:mod:`asr_fx.passes._fold_rules` (the paper's Appendix A), up to float rounding.

Matches ``operator.mul``/``imul``, ``torch.mul``, ``Tensor.mul``/``mul_`` in either operand order,
where ``c`` is a ``get_attr`` tensor (run :func:`fold_constants` first so ``act(F(psi))`` is one)
with one non-unit dimension of the layer's channel count sitting at the layer's channel dimension
(or a single value), and the layer is a call of a conv/conv-transpose, BN/GN/IN/LN or linear module.

Refuses (and reports, leaving the ``mul``): a layer whose output has other users (folding would
change them), a module called at more than one place, parameters shared with another module,
scales that broadcast along a dimension other than the channel one, and layers without a rule.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from ._fold_rules import fold_kind, fold_rule
from ._patterns import ChannelInfo, channel_info, is_mul, module_of, output_rank
from .constant_fold import FOLDED_PREFIX, fetch_attr


@dataclass
class FoldRecord:
    """What happened to one constant ``mul``: ``where`` it went (``bn``/``conv``/... or ``left as Mul``)."""

    mul: str
    site: str
    target: str
    where: str
    reason: str = ""
    from_attention: bool = False

    @property
    def folded(self) -> bool:
        return self.where != "left as Mul"


def site_of(node: fx.Node) -> str:
    """The innermost module path whose ``forward`` created ``node`` (e.g. ``asr.layer1_0_bn3``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def constant_operand(gm: fx.GraphModule, mul: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """``(x, c)`` for a ``mul`` of a graph value by a ``get_attr`` tensor, else ``None``."""
    a, b = mul.args
    for x, c in ((a, b), (b, a)):
        if isinstance(c, fx.Node) and c.op == "get_attr" and isinstance(x, fx.Node) and x.op != "get_attr":
            value = fetch_attr(gm, str(c.target))
            if isinstance(value, torch.Tensor):
                return x, value
    return None


def per_channel_scale(c: torch.Tensor, info: ChannelInfo, rank: int | None) -> torch.Tensor | str:
    """``c`` as a 1-D tensor of ``info.channels`` entries, or the reason it is not per-channel."""
    if not c.is_floating_point():
        return f"scale has dtype {c.dtype}, not floating point"
    if rank is not None and c.dim() > rank:
        return f"scale of shape {tuple(c.shape)} would broadcast the output to rank {c.dim()}"
    big = [i - c.dim() for i, s in enumerate(c.shape) if s != 1]
    if not big:
        return c.reshape(1).expand(info.channels).clone()
    if len(big) > 1:
        return f"scale of shape {tuple(c.shape)} varies along more than one dimension"
    if info.position is None:
        return "the layer's channel dimension depends on the input rank: pass example_inputs"
    if big[0] != info.position or c.shape[big[0]] != info.channels:
        return f"scale of shape {tuple(c.shape)} does not lie along the layer's {info.channels} channels"
    return c.reshape(-1)


def _shares_parameters(gm: fx.GraphModule, module: torch.nn.Module) -> bool:
    own = {id(p) for p in module.parameters(recurse=False)}
    for other in gm.modules():
        if other is not module and any(id(p) in own for p in other.parameters(recurse=False)):
            return True
    return False


def _computed(mul: fx.Node, x: fx.Node) -> bool:
    """Whether the scale was computed from parameters (folded by :func:`fold_constants`), as an
    attention value is, rather than being a parameter itself (a layer scale)."""
    c = mul.args[1] if mul.args[0] is x else mul.args[0]
    return isinstance(c, fx.Node) and str(c.target).startswith(FOLDED_PREFIX)


def fold_scales(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[FoldRecord]]:
    """Fold every per-channel constant ``mul`` into the layer that produced its other operand.

    Modifies ``gm`` in place and returns it with one record per constant ``mul`` seen.
    """
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    records: list[FoldRecord] = []
    for mul in list(gm.graph.nodes):
        if not is_mul(mul):
            continue
        operands = constant_operand(gm, mul)
        if operands is None:
            continue
        x, c = operands
        record = FoldRecord(
            mul=mul.name,
            site=site_of(mul),
            target=str(x.target) if x.op == "call_module" else x.name,
            where="left as Mul",
            from_attention=_computed(mul, x),
        )
        records.append(record)
        module = module_of(gm, x)
        rule = fold_rule(module) if module is not None else None
        info = channel_info(gm, x)
        if rule is None or info is None:
            record.reason = f"the value comes from `{x.name}`, which is not a conv/norm/linear layer"
            continue
        if len(x.users) > 1:
            record.reason = f"`{x.target}`'s output has {len(x.users)} users; folding would change the others"
            continue
        if calls[str(x.target)] > 1:
            record.reason = f"module `{x.target}` is called at {calls[str(x.target)]} places"
            continue
        if _shares_parameters(gm, module):
            record.reason = f"module `{x.target}` shares parameters with another module"
            continue
        v = per_channel_scale(c, info, output_rank(x))
        if isinstance(v, str):
            record.reason = v
            continue
        why = rule(module, v.to(dtype=next(module.parameters(), v).dtype))
        if why is not None:
            record.reason = why
            continue
        record.where = fold_kind(module)
        mul.replace_all_uses_with(x)
        gm.graph.erase_node(mul)
    gm.recompile()
    return gm, records
