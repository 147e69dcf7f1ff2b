"""The model zoos tools/zoo_sweep.py covers beyond torchvision classification: how to build each model
with random weights from its library's own configs (no downloads) and what input it takes.

Each zoo is a function returning ``{name: Entry}``; an entry builds the model lazily.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: timm names that suggest a small member of a family, best first
_SMALL = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "mobile", "b0", "18", "s0", "050", "lite")


@dataclass
class Entry:
    build: Callable[[], torch.nn.Module]
    size: int = 64
    detector: bool = False  # takes a list of images, returns post-processed boxes: eval outputs are compared
    frames: int = 0  # video models: clips of this many frames

    def inputs(self, batch: int, seed: int) -> tuple:
        gen = torch.Generator().manual_seed(seed)
        if self.detector:
            return ([torch.rand(3, self.size, self.size, generator=gen) for _ in range(batch)],)
        shape = (batch, 3) + ((self.frames,) if self.frames else ()) + (self.size, self.size)
        return (torch.randn(shape, generator=gen),)


def _smallest(names: list[str]) -> str:
    def score(name: str) -> tuple[int, int]:
        for rank, word in enumerate(_SMALL):
            if word in name:
                return rank, len(name)
        return len(_SMALL), len(name)

    return min(names, key=score)


def _timm_model(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm  # optional dependency: the test extra

        for kwargs in ({"img_size": 64}, {}):
            try:
                return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
            except TypeError:
                continue
        raise RuntimeError(f"timm could not build {name}")

    return build


def timm_zoo(per_family: int = 1) -> dict[str, Entry]:
    """One (small) model per timm architecture family (the module names under ``timm.models``)."""
    import timm  # optional dependency

    families = _timm_families()
    out: dict[str, Entry] = {}
    for family in families:
        names = timm.list_models(module=family)
        picked: list[str] = []
        while names and len(picked) < per_family:
            best = _smallest(names)
            picked.append(best)
            names = [n for n in names if n != best]
        for name in picked:
            out[f"{family}/{name}"] = Entry(_timm_model(name))
    return out


def _timm_families() -> list[str]:
    import timm  # optional dependency

    return sorted({_module_of(n) for n in timm.list_models()} - {None})


def _module_of(name: str) -> str | None:
    import timm  # optional dependency

    fn = timm.models.model_entrypoint(name)
    module = getattr(fn, "__module__", "")
    return module.rsplit(".", 1)[-1] if module.startswith("timm.models.") else None


def hf_zoo() -> dict[str, Entry]:
    """Hugging Face vision models from small configs."""
    def make(config_name: str, model_name: str, **kwargs: object) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            import transformers  # optional dependency: the test extra

            config = getattr(transformers, config_name)(**kwargs)
            return getattr(transformers, model_name)(config)

        return build

    small = {"num_labels": 3}
    vit = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, **small}
    return {
        "ResNet": Entry(make("ResNetConfig", "ResNetForImageClassification", embedding_size=16, hidden_sizes=[16, 32],
                             depths=[1, 1], **small)),
        "ConvNeXt": Entry(make("ConvNextConfig", "ConvNextForImageClassification", num_stages=2, hidden_sizes=[16, 32],
                               depths=[1, 1], **small)),
        "ViT": Entry(make("ViTConfig", "ViTForImageClassification", **vit), size=32),
        "DINOv2": Entry(make("Dinov2Config", "Dinov2Model", **{**vit, "num_labels": 2}), size=32),
        "Swin": Entry(make("SwinConfig", "SwinForImageClassification", image_size=32, patch_size=2, embed_dim=16,
                           depths=[1, 1], num_heads=[2, 2], window_size=4, **small), size=32),
        "MobileViT": Entry(make("MobileViTConfig", "MobileViTForImageClassification", image_size=64,
                                hidden_sizes=[32, 32, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48],
                                **small)),
        "EfficientNet": Entry(make("EfficientNetConfig", "EfficientNetForImageClassification", image_size=64,
                                   width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
                                   # the config's default 0.99 is TF's decay used as torch's momentum: after the
                                   # sweep's one train step the running statistics are those of a batch of 2 and
                                   # the logits underflow to ~1e-42, where onnxruntime's denormals differ
                                   batch_norm_momentum=0.1, **small)),
        "RegNet": Entry(make("RegNetConfig", "RegNetForImageClassification", embedding_size=16,
                             hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, **small)),
        "SegFormer": Entry(make("SegformerConfig", "SegformerForSemanticSegmentation", num_encoder_blocks=2,
                                depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                                decoder_hidden_size=32, **small)),
        "DETR": Entry(make("DetrConfig", "DetrForObjectDetection", use_pretrained_backbone=False, use_timm_backbone=True,
                           backbone="resnet18", d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, num_queries=5, **small)),
    }


def yolo_zoo() -> dict[str, Entry]:
    """ultralytics YOLO detect / segment / classify / pose, built from the yaml files in the package."""
    def make(yaml: str) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            from ultralytics import YOLO  # optional dependency: the zoo extra

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return YOLO(yaml).model

        return build

    return {y: Entry(make(y)) for y in ("yolov8n.yaml", "yolov8n-seg.yaml", "yolov8n-cls.yaml", "yolo11n.yaml")}


def torchvision_tasks_zoo() -> dict[str, Entry]:
    """torchvision detection, keypoint, segmentation and video models (weights=None)."""
    import torchvision  # optional dependency

    def make(name: str, **kwargs: object) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            return torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs)

        return build

    # the detectors' transform resizes every image to min_size (800 px by default): the sweep's CPU runs keep
    # the 96 px images at 96 px
    det = {"num_classes": 3, "min_size": 96, "max_size": 96}
    return {
        "fasterrcnn_mobilenet_v3_large_320_fpn": Entry(make("fasterrcnn_mobilenet_v3_large_320_fpn", **det), 96, True),
        "retinanet_resnet50_fpn": Entry(make("retinanet_resnet50_fpn", **det), 96, True),
        "keypointrcnn_resnet50_fpn": Entry(make("keypointrcnn_resnet50_fpn", **{**det, "num_classes": 2}), 96, True),
        "ssdlite320_mobilenet_v3_large": Entry(make("ssdlite320_mobilenet_v3_large", num_classes=3), 96, True),  # 320 px
        "fcn_resnet50": Entry(make("fcn_resnet50", num_classes=3, aux_loss=False)),
        "deeplabv3_mobilenet_v3_large": Entry(make("deeplabv3_mobilenet_v3_large", num_classes=3, aux_loss=False)),
        "lraspp_mobilenet_v3_large": Entry(make("lraspp_mobilenet_v3_large", num_classes=3)),
        "r3d_18": Entry(lambda: torchvision.models.get_model("r3d_18", weights=None, num_classes=3), 32, frames=4),
    }


def smp_zoo() -> dict[str, Entry]:
    """segmentation_models_pytorch Unet, FPN and DeepLabV3+ (encoder_weights=None)."""
    def make(arch: str) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            import segmentation_models_pytorch as smp  # optional dependency: the zoo extra

            return getattr(smp, arch)("resnet18", encoder_weights=None, classes=2)

        return build

    return {arch: Entry(make(arch)) for arch in ("Unet", "FPN", "DeepLabV3Plus")}


ZOOS: dict[str, Callable[[], dict[str, Entry]]] = {
    "timm": timm_zoo, "hf": hf_zoo, "yolo": yolo_zoo, "tvtasks": torchvision_tasks_zoo, "smp": smp_zoo,
}
