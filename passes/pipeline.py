"""The fusion pipeline: the passes :func:`asr_fx.fuse` runs, in order.

Equivalence: each pass keeps the eval-mode function (see its docstring); so does their sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from ._fold_rules import TensorUsage
from .cleanup import drop_dead_nodes, eliminate_dead_code
from .constant_fold import fold_constants
from .fold import FoldRecord, fold_scales
from .fold_conv_bn import fold_conv_bn
from .propagate import propagate_scales


def fuse_pipeline(
    gm: fx.GraphModule,
    *,
    fold_bn: bool = False,
    check: Callable[[fx.GraphModule], None] | None = None,
) -> tuple[fx.GraphModule, list[FoldRecord]]:
    """constant-fold -> (check) -> fold scales -> propagate -> cleanup -> (conv-BN fold -> cleanup).

    ``gm`` must be traced with ASR blocks inlined and be in eval mode; it is modified in place.
    ``check`` sees the graph after constant folding (e.g. to refuse non-finite attention values).
    """
    fold_constants(gm)
    if check is not None:
        check(gm)
    drop_dead_nodes(gm)
    usage = TensorUsage(gm)
    gm, records = fold_scales(gm, usage)
    propagate_scales(gm, records, usage)
    eliminate_dead_code(gm)
    if fold_bn:
        fold_conv_bn(gm)
        eliminate_dead_code(gm)
    return gm, records
