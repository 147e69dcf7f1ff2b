"""Graph passes of asr-fx, each ``GraphModule -> GraphModule`` (or a report).

Installed as ``asr_fx.passes``; import it under that name only.

Pipeline used by :func:`asr_fx.fuse`::

    trace -> fold_constants -> fold_scales -> propagate_scales -> fold_conv_bn -> cleanup
"""

if __name__ == "passes":  # pragma: no cover - guards a mis-configured sys.path
    raise ImportError("the graph passes are the subpackage 'asr_fx.passes': `import asr_fx.passes`, not `import passes`")

from .attention_patterns import ChannelAttention, find_channel_attention
from .cleanup import eliminate_dead_code
from .constant_fold import fold_constants
from .convert_existing import convert_existing_attention
from .fold import FoldRecord, fold_scales
from .fold_conv_bn import fold_conv_bn
from .insert import insert_asr
from .locate import Site, find_residual_sites
from .pipeline import fuse_pipeline
from .propagate import propagate_scales
from .rules import find_auto_sites, find_branch_sites, find_norm_act_sites, find_transformer_sites
from .trace import ASRTracer, trace

__all__ = [
    "ASRTracer",
    "ChannelAttention",
    "FoldRecord",
    "Site",
    "convert_existing_attention",
    "eliminate_dead_code",
    "find_auto_sites",
    "find_branch_sites",
    "find_channel_attention",
    "find_norm_act_sites",
    "find_residual_sites",
    "find_transformer_sites",
    "fold_constants",
    "fold_conv_bn",
    "fold_scales",
    "fuse_pipeline",
    "insert_asr",
    "propagate_scales",
    "trace",
]
