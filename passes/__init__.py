"""Graph passes of asr-fx. Installed as ``asr_fx.passes``; import it under that name only.

Layout: the scale-algebra core (:mod:`.op_tables`, :mod:`.graph_queries`, :mod:`.scale_algebra`,
:mod:`.fold_targets`, :mod:`.functional_fold_targets`, :mod:`.fold_plan`), the pass contract and
runner (:mod:`.infra`), the passes, and the declared fusion pipeline (:mod:`.pipeline`). The README's
"How the code is laid out" lists every module and both pipelines.
"""

if __name__ == "passes":  # pragma: no cover - guards a mis-configured sys.path
    raise ImportError("the graph passes are the subpackage 'asr_fx.passes': `import asr_fx.passes`, not `import passes`")

from .attention_patterns import ChannelAttention, find_channel_attention
from .cleanup import eliminate_dead_code
from .constant_fold import fold_constants
from .convert_existing import convert_existing_attention
from .fold import fold_scales
from .fold_conv_bn import fold_conv_bn
from .infra import PassContext, PassResult, Pipeline
from .insert import insert_asr
from .locate import Site, find_residual_sites
from .pipeline import FUSE_PIPELINE, fuse_pipeline
from .placement import (PLACEMENT_RULES, PlacementRule, find_auto_sites, find_branch_sites, find_norm_act_sites,
                        find_transformer_sites)
from .propagate import propagate_scales
from .records import FoldRecord
from .trace import ASRTracer, trace

__all__ = [
    "ASRTracer",
    "ChannelAttention",
    "FUSE_PIPELINE",
    "FoldRecord",
    "PLACEMENT_RULES",
    "PassContext",
    "PassResult",
    "Pipeline",
    "PlacementRule",
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
