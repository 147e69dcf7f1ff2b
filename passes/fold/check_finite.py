"""Refuse non-finite constants before they are folded: a NaN/Inf scale would poison the weights.

The one NaN/Inf check of fusion: :func:`require_finite` for one value, and the pass
:func:`check_finite_constants` over every constant :func:`~asr_fx.passes.fold.constant_fold.fold_constants` made.
Changes nothing; raises :class:`~asr_fx.errors.ASRError` naming the site and the way out.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from asr_fx.errors import UnsupportedModelError

from ..graph.graph_queries import fetch_attr, site_of
from ..infra import PassContext, PassResult
from .constant_fold import FOLDED_PREFIX


def require_finite(value: torch.Tensor, where: str) -> None:
    """Raise unless every entry of the attention value at site ``where`` is finite."""
    if not torch.isfinite(value).all():
        raise UnsupportedModelError(f"the attention value at site `{where}` is not finite (NaN/Inf): the checkpoint's "
                                    "psi or attention weights are broken; retrain or restore them before fusing",
                                    reason="non-finite")


def check_finite_constants(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    """Refuse the graph if a constant computed by constant folding (from psi) is NaN/Inf (a pipeline pass:
    ``gm`` is returned unchanged, without records)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith(FOLDED_PREFIX):
            require_finite(fetch_attr(gm, str(node.target)), site_of(node) or node.name)
    return PassResult(gm)
