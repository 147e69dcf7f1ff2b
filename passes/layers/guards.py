"""Layers whose output is not what their weights suggest: the guards the layer registry
(:mod:`~asr_fx.passes.layers.registry`) asks before it offers a layer module as a fold target. A fold
rewrites a layer's weights so that ``layer'(x) == layer(x) * v``; that holds only when the layer's output is
the function of its weights the rule assumes. It is not, and every scale is refused with the reason, when:

- the module has forward hooks or pre-hooks (a hook may change the output after the folded layer ran; the
  old-style ``weight_norm`` is such a pre-hook);
- its weights are under a parametrization (``spectral_norm``, ``weight_norm``): ``weight`` is recomputed
  from other tensors on every call, a fold into it is lost or rescaled;
- its ``forward`` was replaced on the instance;
- a non-affine InstanceNorm whose ``num_features`` differs from its input's channels (torch ignores
  ``num_features`` without an affine; a folded affine of that size would not fit), or an InstanceNorm1d on
  an unbatched (2-d) input, where the channels are the first dimension.

Nothing here changes the graph.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from ..graph.graph_queries import output_shape
from ..graph.refusals import Refusal


def layer_refusal(module: nn.Module | None) -> Refusal | None:
    """Why a fold into ``module``'s weights would not scale its output, or ``None``."""
    if module is None:
        return None
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    if hooks:
        kinds = sorted({type(h).__name__ if not callable(h) or not hasattr(h, "__name__") else h.__name__
                        for h in hooks})
        return Refusal(f"it has forward hooks or pre-hooks ({', '.join(kinds)}): they change its output after the "
                       "fold (old-style weight_norm is one); remove them before fuse")
    if parametrize.is_parametrized(module):
        names = ", ".join(sorted(getattr(module, "parametrizations", {}).keys()))
        return Refusal(f"its {names} is computed by a parametrization (spectral_norm, weight_norm, ...) on every "
                       "call; bake it in first with torch.nn.utils.parametrize.remove_parametrizations(module, name)")
    if "forward" in vars(module):
        return Refusal("its forward was replaced on the instance; the fold rule assumes the class's forward")
    return None


def instance_norm_refusal(module: nn.Module, node: fx.Node, channels: int) -> Refusal | None:
    """Why an InstanceNorm call cannot take a per-channel affine, or ``None``."""
    if not isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return None
    shape = output_shape(node)
    if isinstance(module, nn.InstanceNorm1d) and (shape is None or len(shape) == 2):
        if shape is None and not module.affine:
            return Refusal("an InstanceNorm1d may be called on an unbatched (C, L) input: pass example_inputs to fuse")
        if shape is not None:
            return Refusal("an InstanceNorm1d on an unbatched (C, L) input")
    if not module.affine and shape is not None and module.num_features != channels:
        return Refusal(f"a non-affine InstanceNorm with num_features={module.num_features} on an input of "
                       f"{channels} channels (torch ignores num_features without an affine)")
    return None


def model_dtype(gm: fx.GraphModule) -> torch.dtype | None:
    """The one floating dtype of every parameter and buffer of ``gm``, or ``None`` (none, or mixed)."""
    dtypes = {t.dtype for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


__all__ = ["instance_norm_refusal", "layer_refusal", "model_dtype"]
