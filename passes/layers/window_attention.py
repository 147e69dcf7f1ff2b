"""Window attention as torchvision's Swin calls it (``shifted_window_attention(...)``, one traced
function): a layer whose features (last dimension) are its output projection's, so placement offers
a site after it; a scale there cannot fold, since the projection is applied inside the one call the
fold pass cannot rewrite. The rule says so before training, so a user leaves the site out."""

from __future__ import annotations

import torch.fx as fx

from .base import LayerMatch, LayerRule, NoMatch, Refusal, TargetOrRefusal

#: why a scale after a window attention call cannot fold
SWIN_REFUSAL = Refusal("Swin's shifted_window_attention applies its output projection inside one function "
                       "call, which the fold pass cannot rewrite")


def _function_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def window_attention_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, int] | None:
    """``(projection path, channels)`` for torchvision's ``shifted_window_attention(...)`` call (Swin)."""
    if _function_name(node) != "shifted_window_attention":
        return None
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("proj_weight")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    path = str(weight.target).rsplit(".", 1)[0]
    return path, int(gm.get_parameter(str(weight.target)).shape[0])


class WindowAttentionRule(LayerRule):
    """``shifted_window_attention(...)``: a site (features last) whose scale cannot fold."""

    name = "window_attention"

    def recognise(self, gm: fx.GraphModule, node: fx.Node) -> LayerMatch | NoMatch:
        found = window_attention_of(gm, node)
        if found is None:
            return NoMatch("not a call of torchvision's shifted_window_attention")
        path, channels = found
        return LayerMatch(self, channels, -1, path.rsplit(".", 1)[0], path, SWIN_REFUSAL)

    def output_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        if window_attention_of(gm, node) is None:
            return NoMatch("not a call of torchvision's shifted_window_attention")
        return SWIN_REFUSAL


WINDOW_ATTENTION = WindowAttentionRule()
