"""Attention frozen after training: each input-dependent channel attention replaced by the mean
value it produced on data, so :func:`asr_fx.fuse` can fold it (see :mod:`asr_fx.stripe` for the
measurement this rests on).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn

from asr_fx.errors import UnknownSiteError
from asr_fx.passes import trace
from asr_fx.passes.graph.modes import preserved_training_modes
from asr_fx.stripe import FROZEN_PREFIX, Batches, SiteStats, StripeStats, batch_inputs, collect

FREEZE_KEY = "asr_fx.freeze"


@dataclass
class FrozenSite:
    """One frozen attention: ``v`` (its mean value, ``C``), the per-channel std the freeze ignores,
    and the buffer holding ``v``."""

    site: str
    mul: str
    buffer: str
    channels: int
    ignored_std_mean: float
    ignored_std_max: float
    std_ratio: float
    output_change: dict[str, float] = field(default_factory=dict)
    """the model's output change with only this site frozen (``per_site=True``)"""


@dataclass
class FreezeReport:
    """What :func:`freeze_attention` did: the frozen sites and the output change it caused.

    ``output_change``: on the held-out data (or the calibration data where none was given, then
    ``data == "calibration"``): ``max_abs`` ``max|frozen - original|``, ``rel`` that over
    ``max|original|``, ``argmax_agreement`` (share of inputs with the same top-1 class, 2-D outputs).
    """

    sites: list[FrozenSite] = field(default_factory=list)
    output_change: dict[str, float] = field(default_factory=dict)
    data: str = "held-out"

    def table(self, tablefmt: str = "github") -> str:
        per_site = any(s.output_change for s in self.sites)
        rows = [(s.site, s.channels, f"{s.ignored_std_mean:.3g}", f"{s.ignored_std_max:.3g}", f"{s.std_ratio:.3g}")
                + ((f"{s.output_change['rel']:.3g}",) if per_site else ()) for s in self.sites]
        headers = ["site", "C", "ignored std (mean)", "ignored std (max)", "std ratio"]
        text = tabulate(rows, headers=headers + (["output change (rel), this site alone"] if per_site else []),
                        tablefmt=tablefmt)
        if self.output_change:
            change = ", ".join(f"{k} {v:.4g}" for k, v in self.output_change.items())
            text += f"\n\noutput change on {self.data} data: {change}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [s.__dict__ for s in self.sites], "output_change": dict(self.output_change), "data": self.data}

    def __str__(self) -> str:
        return self.table()


def _gate_operand(mul: fx.Node, gate_name: str) -> int:
    """Which argument of ``mul`` carries the gate (possibly through view/expand steps)."""
    for i, arg in enumerate(mul.args):
        node = arg
        for _ in range(9):
            if not isinstance(node, fx.Node):
                break
            if node.name == gate_name:
                return i
            if not node.args:
                break
            node = node.args[0]
    raise UnknownSiteError(f"multiply `{mul.name}` does not read the attention gate `{gate_name}`")


def _broadcast_shape(site: SiteStats) -> tuple[int, ...]:
    return (1, site.channels) + (1,) * (-site.channel_pos - 1)


def output_change(reference: nn.Module, changed: nn.Module, batches: Batches) -> dict[str, float]:
    """How far ``changed``'s outputs are from ``reference``'s on ``batches`` (both in eval mode)."""
    max_abs, max_ref, agree, total = 0.0, 0.0, 0, 0
    with preserved_training_modes(reference, changed):
        reference.eval(), changed.eval()
        with torch.no_grad():
            for batch in batches:
                inputs = batch_inputs(batch)
                ref, out = reference(*inputs), changed(*inputs)
                max_abs = max(max_abs, float((out - ref).abs().max()))
                max_ref = max(max_ref, float(ref.abs().max()))
                if ref.dim() == 2:
                    agree += int((ref.argmax(1) == out.argmax(1)).sum())
                    total += ref.shape[0]
    change = {"max_abs": max_abs, "rel": max_abs / max(max_ref, 1e-30)}
    if total:
        change["argmax_agreement"] = agree / total
    return change


def _placement(model: nn.Module) -> dict[str, Any]:
    """The device (and floating dtype) of the model's parameters, for the frozen constants."""
    ref = next(iter(model.parameters()), None)
    if ref is None:
        return {}
    return {"device": ref.device, "dtype": ref.dtype} if ref.is_floating_point() else {"device": ref.device}


def _freeze(model: nn.Module, sites: Sequence[SiteStats], leaf_modules: Any) -> tuple[fx.GraphModule, list[FrozenSite]]:
    """A traced copy of ``model`` with each site's gate replaced by a buffer holding its mean ``v``."""
    gm = trace(copy.deepcopy(model), leaf_modules)
    placement = _placement(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    frozen: list[FrozenSite] = []
    for site in sites:
        mul = nodes.get(site.mul)
        if mul is None:
            raise UnknownSiteError(f"the statistics name multiply `{site.mul}`, which is not in this model's graph; "
                                   "collect them on the same model")
        index = _gate_operand(mul, site.gate)
        buffer = FROZEN_PREFIX + re.sub(r"\W", "_", site.site or site.mul)
        if hasattr(gm, buffer):
            buffer += "_" + site.mul
        gm.register_buffer(buffer, site.mean.reshape(_broadcast_shape(site)).to(**placement).clone())
        with gm.graph.inserting_before(mul):
            constant = gm.graph.get_attr(buffer)
        mul.args = tuple(constant if i == index else a for i, a in enumerate(mul.args))
        std = site.std
        frozen.append(FrozenSite(site=site.site, mul=site.mul, buffer=buffer, channels=site.channels,
                                 ignored_std_mean=float(std.mean()), ignored_std_max=float(std.max()),
                                 std_ratio=site.std_ratio))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm.eval(), frozen


def freeze_attention(
    model: nn.Module,
    batches: Batches,
    *,
    held_out: Batches | None = None,
    stats: StripeStats | None = None,
    per_site: bool = False,
    leaf_modules: Any = None,
) -> fx.GraphModule:
    """Replace every input-dependent channel attention by the mean value ``v`` it produced on ``batches``.

    ``x * act(F(pool(x)))`` becomes ``x * v``, ``v`` a constant buffer shaped to broadcast along the
    channel dimension (``_folded_stripe_<site>``); the pooling and the attention network go away.
    Then :func:`asr_fx.fuse` folds ``v`` into the conv/norm/linear layer that produced ``x``, or
    reports the site where it cannot (e.g. after an activation, as in MobileNetV3).

    Equivalence: none by design. The frozen model computes what ``model`` computes with each
    attention's output replaced by its data mean; the std that ignores is in the report, and the
    output change on ``held_out`` (default: ``batches``) too; ``per_site=True`` also measures the
    change with each site frozen alone (one more pass over the data per site). ``model`` is not
    changed; the result is a GraphModule in eval mode, its :class:`FreezeReport` in
    ``freeze_report(result)``. ``stats``: a :func:`collect` result on the same model to reuse.
    """
    batches = list(batches) if stats is None or held_out is None else batches
    stats = stats if stats is not None else collect(model, batches, leaf_modules=leaf_modules)
    data = list(held_out) if held_out is not None else batches
    gm, frozen = _freeze(model, list(stats), leaf_modules)
    if per_site:
        for site, record in zip(stats, frozen):
            alone, _ = _freeze(model, [site], leaf_modules)
            record.output_change = output_change(model, alone, data)
    report = FreezeReport(frozen, data="held-out" if held_out is not None else "calibration")
    report.output_change = output_change(model, gm, data)
    gm.meta[FREEZE_KEY] = report
    return gm


def freeze_report(frozen: nn.Module) -> FreezeReport | None:
    """The :class:`FreezeReport` that :func:`freeze_attention` attached to its result."""
    meta = getattr(frozen, "meta", {})
    return meta.get(FREEZE_KEY) if isinstance(meta, dict) else None


__all__ = ["FREEZE_KEY", "FreezeReport", "FrozenSite", "freeze_attention", "freeze_report", "output_change"]
