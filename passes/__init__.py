"""Graph passes of asr-fx. Installed as ``asr_fx.passes``; import it under that name only.

Grouped by phase, in the order a model meets them:

- :mod:`.capture`: module -> traced GraphModule (and recorded shapes);
- :mod:`.placement`: GraphModule -> sites (:data:`.placement.rules.PLACEMENT_RULES`);
- :mod:`.forms`: ASR blocks, their insertion, and the training forms applied at instrument and undone at fuse;
- :mod:`.fold`: inference GraphModule -> the same function with the constant scales folded into layers;
- :mod:`.export`: fused GraphModule -> the attention forms torch's ONNX exporter takes;
- :mod:`.layers`: per layer family, what can take a scale and how (read by placement and fold);
- :mod:`.graph`: op tables, read-only node queries, alias analysis, records.

At the root: the pass contract and runner (:mod:`.infra`) and the two declared pipelines
(:mod:`.pipelines`).
"""

if __name__ == "passes":  # pragma: no cover - guards a mis-configured sys.path
    raise ImportError("the graph passes are the subpackage 'asr_fx.passes': `import asr_fx.passes`, not `import passes`")

from .placement.attention_patterns import ChannelAttention, find_channel_attention
from .fold.cleanup import eliminate_dead_code
from .fold.constant_fold import fold_constants
from .forms.convert_existing import convert_existing_attention
from .fold.fold import fold_scales
from .fold.fold_conv_bn import fold_conv_bn
from .infra import PassContext, PassResult, Pipeline
from .forms.insert import insert_asr
from .placement.locate import Site, find_residual_sites
from .pipelines import FUSE_PIPELINE, fuse_pipeline
from .placement.rules import (PLACEMENT_RULES, PlacementRule, find_auto_sites, find_branch_sites, find_norm_act_sites,
                        find_transformer_sites)
from .fold.propagate import propagate_scales
from .graph.records import FoldRecord
from .capture.trace import ASRTracer, trace

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
