"""The model zoos tools/zoo_sweep.py covers beyond torchvision classification: how to build each model
with random weights from its library's own configs (no downloads) and what input it takes.

Each zoo is a function returning ``{name: Entry}``; an entry builds the model lazily.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

#: timm names that suggest a small member of a family, best first
_SMALL = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "mobile", "b0", "18", "s0", "050", "lite")
#: input sizes tried for a timm model, smallest first (the model's pretrained_cfg input size is added)
TIMM_SIZES = (64, 96, 128, 160, 192, 224, 240, 256)
#: a model over this many parameters is built from a reduced config (:data:`SHRINK_KWARGS`)
SHRINK_ABOVE = 60_000_000
#: constructor keywords that make a timm model smaller, tried in this order on models over
#: :data:`SHRINK_ABOVE` parameters; each is kept when the model builds with it and has fewer parameters,
#: until it is under the limit (a constructor without the keyword raises TypeError: skipped)
SHRINK_KWARGS: tuple[dict, ...] = (
    {"depth": 2},  # ViT-style: number of blocks
    {"embed_dim": 192, "num_heads": 3},  # ViT-style width (head dim 64)
    {"intermediate_size": 768},  # Gemma/Qwen-style MLP width
    {"channel_multiplier": 0.25},  # EfficientNet-style builders (MobileNetV5)
    {"num_features": 2016},  # NASNet: cell width is num_features // 24 (84; 42 does not run)
    {"num_blocks": 2},  # MLP-Mixer / gMLP: number of blocks
    {"mlp_ratio": 0.25},  # VGG's pre-logits ConvMlp, MLP widths
)


@dataclass
class Entry:
    build: Callable[[], torch.nn.Module]
    size: int = 64
    detector: bool = False  # takes a list of images, returns post-processed boxes: eval outputs are compared
    frames: int = 0  # video models: clips of this many frames
    #: builds the model for one input size (timm: ``img_size=``); with ``sizes``, the sweep takes the first
    #: size whose model runs a batch of 2
    sized: Callable[[int], torch.nn.Module] | None = None
    sizes: tuple[int, ...] = ()
    #: the constructor keywords that reduced the model (:data:`SHRINK_KWARGS`), for the results table
    shrunk: dict = field(default_factory=dict)
    #: text models: token ids below this, ``size`` tokens per sequence
    vocab: int = 0
    #: text models: an attention mask follows the ids, the last sequence padded in its second half (the first
    #: sequence has no padding, so the sweep's batch-independence check compares it alone without a mask)
    masked: bool = False
    #: audio models: the shape of one sample (a waveform's length; a spectrogram's mel bins and frames)
    signal: tuple[int, ...] = ()

    def inputs(self, batch: int, seed: int) -> tuple:
        gen = torch.Generator().manual_seed(seed)
        if self.vocab:
            ids = torch.randint(2, self.vocab, (batch, self.size), generator=gen)  # 0 and 1: special tokens
            if not self.masked:
                return (ids,)
            mask = torch.ones(batch, self.size, dtype=torch.long)
            if batch > 1:
                mask[-1, self.size // 2:] = 0
            return ids, mask
        if self.signal:
            return (torch.randn((batch, *self.signal), generator=gen),)
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


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _timm_create(name: str, **kwargs: Any) -> torch.nn.Module:
    import timm  # optional dependency: the test extra

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _timm_size(name: str, **kwargs: object) -> int:
    """The parameter count of ``name`` built with ``kwargs``, built on the meta device (no memory, no init cost)
    where its constructor allows it."""
    try:
        with torch.device("meta"):
            return _count(_timm_create(name, **kwargs))
    except TypeError:
        raise
    except Exception:  # noqa: BLE001 - an init that needs real tensors: build it for real
        return _count(_timm_create(name, **kwargs))


def timm_shrink_kwargs(name: str) -> dict:
    """The keywords of :data:`SHRINK_KWARGS` that bring ``name`` under :data:`SHRINK_ABOVE` parameters (greedy,
    in order; ``{}`` for a model already under it or one whose constructor takes none of them)."""
    kept: dict = {}
    size = _timm_size(name)
    for extra in SHRINK_KWARGS:
        if size <= SHRINK_ABOVE:
            break
        try:
            smaller = _timm_size(name, **kept, **extra)
        except Exception:  # noqa: BLE001 - the constructor does not take it (or not this value): next
            continue
        if smaller < size:
            kept, size = {**kept, **extra}, smaller
        gc.collect()
    return kept


def _timm_model(name: str, shrink: dict | None = None) -> Callable[..., torch.nn.Module]:
    """A builder of ``name`` for one input size: ``img_size=size`` where the constructor takes it."""
    def build(size: int = 64) -> torch.nn.Module:
        for kwargs in ({"img_size": size}, {}):
            try:
                return _timm_create(name, **(shrink or {}), **kwargs)
            except TypeError:
                continue
        raise RuntimeError(f"timm could not build {name}")

    return build


def timm_sizes(name: str) -> tuple[int, ...]:
    """:data:`TIMM_SIZES` and the model's pretrained_cfg input size, ascending."""
    import timm  # optional dependency

    sizes = set(TIMM_SIZES)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.input_size:
        sizes.add(int(cfg.input_size[-1]))
    return tuple(sorted(sizes))


def timm_entry(name: str) -> Entry:
    """One timm model: reduced where it is large (:func:`timm_shrink_kwargs`, decided on the first build and
    recorded in ``Entry.shrunk``), built for the smallest input size it runs on (:func:`timm_sizes`)."""
    shrunk: dict = {}
    decided: list[bool] = []

    def sized(size: int = 64) -> torch.nn.Module:
        if not decided:
            shrunk.update(timm_shrink_kwargs(name))
            decided.append(True)
        return _timm_model(name, shrunk)(size)

    return Entry(sized, sized=sized, sizes=timm_sizes(name), shrunk=shrunk)


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
            out[f"{family}/{name}"] = timm_entry(name)
    return out


def _timm_families() -> list[str]:
    import timm  # optional dependency

    return sorted({family for n in timm.list_models() if (family := _module_of(n)) is not None})


def _module_of(name: str) -> str | None:
    import timm  # optional dependency

    fn = timm.models.model_entrypoint(name)
    module = getattr(fn, "__module__", "")
    return module.rsplit(".", 1)[-1] if module.startswith("timm.models.") else None


def hf_zoo() -> dict[str, Entry]:
    """Hugging Face vision and text models from small configs (text models take token ids)."""
    def make(config_name: str, model_name: str, **kwargs: object) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            import transformers  # optional dependency: the test extra

            config = getattr(transformers, config_name)(**kwargs)
            return getattr(transformers, model_name)(config)

        return build

    small = {"num_labels": 3}
    vit = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, **small}
    text = {"vocab_size": 100, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    return {
        "BERT": Entry(make("BertConfig", "BertForSequenceClassification", hidden_size=32, max_position_embeddings=64,
                           **text, **small), size=16, vocab=100),
        "T5-encoder": Entry(make("T5Config", "T5EncoderModel", vocab_size=100, d_model=32, d_kv=16, d_ff=64,
                                 num_layers=2, num_heads=2), size=16, vocab=100),
        "BERT-masked": Entry(make("BertConfig", "BertForSequenceClassification", hidden_size=32,
                                  max_position_embeddings=64, **text, **small), size=16, vocab=100, masked=True),
        "RoBERTa": Entry(make("RobertaConfig", "RobertaForSequenceClassification", hidden_size=32,
                              max_position_embeddings=64, pad_token_id=1, **text, **small), size=16, vocab=100,
                         masked=True),
        "DistilBERT": Entry(make("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=100, dim=32,
                                 n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, **small),
                            size=16, vocab=100, masked=True),
        "GPT-2": Entry(make("GPT2Config", "GPT2Model", vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                            bos_token_id=0, eos_token_id=0), size=16, vocab=100),
        "Llama": Entry(make("LlamaConfig", "LlamaForSequenceClassification", hidden_size=32, num_key_value_heads=1,
                            max_position_embeddings=64, pad_token_id=0, **text, **small), size=16, vocab=100,
                       masked=True),
        "Wav2Vec2": Entry(make("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                               classifier_proj_size=16, **small), signal=(1600,)),
        "Whisper-encoder": Entry(make("WhisperConfig", "WhisperForAudioClassification", vocab_size=100,
                                      num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                      encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2,
                                      decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16,
                                      classifier_proj_size=16, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                      decoder_start_token_id=0, **small), signal=(16, 32)),
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
        "DETR": Entry(make("DetrConfig", "DetrForObjectDetection", use_pretrained_backbone=False,
                           use_timm_backbone=True,
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
                return cast(torch.nn.Module, YOLO(yaml).model)

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
        # 320 px
        "ssdlite320_mobilenet_v3_large": Entry(make("ssdlite320_mobilenet_v3_large", num_classes=3), 96, True),
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
