"""Applying a finished fold plan: the only step of the fold core that changes parameters and the graph.

:func:`apply_fold` folds each 1-D scale of a plan into its layer (:attr:`Target.apply`, cast to the
layer's dtype) and drops the ``mul`` (its users read its graph operand). The plan was checked before
(:mod:`~asr_fx.passes.fold.fold_plan`): every layer takes its scale, nothing else uses what changes, and
no dtype changes; so the graph computes what it did, up to float rounding.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .scale_algebra import MulFold, Plan


def apply_plan(plan: Plan) -> None:
    """Fold each 1-D scale into its target, cast to the target's dtype (where that is unknown,
    :func:`~asr_fx.passes.fold.fold_plan.match` let only a scale in the default dtype through)."""
    with torch.no_grad():
        for target, vec in plan:
            target.apply(vec.to(target.dtype) if target.dtype is not None else vec)


def apply_fold(gm: fx.GraphModule, fold: MulFold) -> None:
    """Apply ``fold.plan`` and drop ``fold.mul = x * c`` (its users read ``x``)."""
    apply_plan(fold.plan)
    fold.mul.replace_all_uses_with(fold.x)
    gm.graph.erase_node(fold.mul)
