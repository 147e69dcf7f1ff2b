"""The input shape a model documents about itself, so nobody has to type ``--input-shape`` for it.

Read without running the model (cheap: callers use it before any expensive step), first match wins:

1. the shape an instrumented model recorded (:class:`asr_fx.ASRConfig`'s ``input_shape``);
2. a ViT-style patch embedding's image size (``patch_embed.img_size``, timm; ``image_size``, torchvision),
   which beats the pretrained config when the model was built for another size;
3. timm's ``pretrained_cfg["input_size"]`` (``(C, H, W)``);
4. a Hugging Face config's ``image_size`` and ``num_channels``;
5. torchvision's documented sizes for its classification models (224 x 224; Inception v3 299 x 299).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from asr_fx.config import asr_config

#: torchvision classification models whose documented input is not 224 x 224 (by class name)
TORCHVISION_SIZES = {"Inception3": 299}
TORCHVISION_DEFAULT = 224


def _pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    return None


def _channels(model: nn.Module, default: int = 3) -> int:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (list, tuple)) and len(cfg["input_size"]) == 3:
        return int(cfg["input_size"][0])
    hf = getattr(model, "config", None)
    channels = getattr(hf, "num_channels", None)
    return channels if isinstance(channels, int) and channels > 0 else default


def _is_torchvision_classifier(model: nn.Module) -> bool:
    module = type(model).__module__
    return module.startswith("torchvision.models.") and module.count(".") == 2  # not .detection/.segmentation/...


def default_input_shape(model: nn.Module, batch: int = 1) -> list[int] | None:
    """``[batch, C, H, W]`` the model documents (see the module docstring), or None when it says nothing."""
    recorded = asr_config(model)
    if recorded is not None and recorded.input_shape:
        return [batch, *recorded.input_shape[1:]]
    patch_embed = getattr(model, "patch_embed", None)
    size = _pair(getattr(patch_embed, "img_size", None)) if patch_embed is not None else None
    if size is None and _is_torchvision_classifier(model):
        size = _pair(getattr(model, "image_size", None))
    if size is not None:
        return [batch, _channels(model), *size]
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        shape = cfg.get("input_size")
        if isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(d, int) for d in shape):
            return [batch, *shape]
    hf = getattr(model, "config", None)
    size = _pair(getattr(hf, "image_size", None)) if hf is not None else None
    if size is not None:
        return [batch, _channels(model), *size]
    if _is_torchvision_classifier(model):
        side = TORCHVISION_SIZES.get(type(model).__name__, TORCHVISION_DEFAULT)
        return [batch, 3, side, side]
    return None
