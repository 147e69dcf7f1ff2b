"""The model a command works on, from the model-source options (:func:`asr_fx.cli.options.add_model_source`).

Imports torch: the command modules import this module only when a command runs. Every check that
costs nothing (the output folder, the opset, the device) has a function here that the commands call
before loading the model.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

import asr_fx
from asr_fx.foreign_checkpoints import LoadedCheckpoint, load_checkpoint
from asr_fx.errors import ASRError
from asr_fx.passes import trace


def load_from_args(args: argparse.Namespace, path: Path) -> LoadedCheckpoint:
    """:func:`asr_fx.checkpoint.load_checkpoint` with the model-source and ASR options."""
    options = {"attention": args.attention, "attention_kwargs": args.attention_args,
               "rule": getattr(args, "rule", None), "sites": getattr(args, "sites", None),
               "delta": getattr(args, "delta", None), "activation": getattr(args, "activation", None)}
    return load_checkpoint(path, factory=args.model, factory_kwargs=args.factory_args, asr_options=options,
                           trust=args.trust_checkpoint, input_shape=args.input_shape, leaf_modules=args.leaf_modules)


def load_model_source(spec: str | Path, args: argparse.Namespace) -> nn.Module:
    """The model (eval mode, on ``--device``) a MODEL argument names: ``PKG.MODULE:FACTORY`` (random weights,
    built with ``--factory-args``) or any checkpoint ``asr-fx fuse`` reads."""
    device = torch_device(args.device)
    if not Path(spec).exists() and ":" in str(spec):
        model = asr_fx.build(str(spec), **(args.factory_args or {}))
    else:
        model = load_from_args(args, Path(spec)).model
    check_leaf_modules(model, args.leaf_modules)
    return model.to(device).eval()


def torch_device(name: str) -> torch.device:
    """``--device`` as a torch device, refused when this machine does not have it."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ASRError(f"--device {name}: CUDA is not available here (torch.cuda.is_available() is False); "
                           "use --device cpu")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ASRError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)


def check_opset_option(opset: int | None) -> None:
    """Refuse an ``--opset`` no exporter writes, before any work (one older than 18 is tried: torch's
    exporter converts down when it can, and the export refuses the file when not)."""
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not 7 <= opset <= newest:
        raise ASRError(f"--opset {opset}: ONNX opsets go from 7 to {newest} (the installed onnx's newest); "
                       "torch's exporter writes 18 and newer, older ones where it can convert the model")


def check_writable_folder(folder: Path, option: str) -> None:
    """Refuse an output folder that is missing or not writable, before any expensive step.

    Lead, at merge: the "lib" branch adds a writability check to the library; call it here instead.
    """
    if not folder.is_dir():
        raise ASRError(f"the output folder {str(folder)!r} (of {option}) does not exist: create it first")
    try:  # the real test (os.access is wrong for root and on some network file systems)
        fd, probe = tempfile.mkstemp(prefix=".asr-fx-write-check-", dir=folder)
    except OSError as exc:
        raise ASRError(f"the output folder {str(folder)!r} (of {option}) is not writable ({exc.strerror}): "
                       "choose another folder or fix its permissions") from None
    os.close(fd)
    os.remove(probe)


def check_leaf_modules(model: nn.Module, names: Sequence[str] | None) -> None:
    """Refuse ``--leaf-modules`` names that are not module paths of ``model``."""
    if not names:
        return
    paths = [n for n, _ in model.named_modules() if n]
    unknown = [n for n in names if n not in paths]
    if unknown:
        hints = "".join(f"; {n!r}: did you mean {m[0]!r}?" for n in unknown
                        if (m := difflib.get_close_matches(n, paths, n=1)))
        raise ASRError(f"--leaf-modules: {', '.join(repr(n) for n in unknown)} match(es) no module of the model "
                       f"(give module paths as named by model.named_modules(), such as {paths[0]!r}){hints}")


def factory_of(model: nn.Module, given: str | None) -> str | None:
    """The ``PKG.MODULE:FACTORY`` that built ``model``: ``--model``, or what ``asr_fx.build`` / the config recorded."""
    if given:
        return given
    recorded = getattr(model, "_asr_fx_factory", None) or (asr_fx.get_config(model) or {}).get("factory") or {}
    return recorded.get("factory")


def default_input_shape(model: nn.Module, factory: str | None = None) -> list[int] | None:
    """The input shape (batch 1) a model documents: timm's ``pretrained_cfg["input_size"]``, a Hugging Face
    config's ``image_size``/``num_channels``, or torchvision's weights metadata for its builder; else None.

    Lead, at merge: the "lib" branch adds ``default_input_shape(model)`` to the library; this local copy
    is the CLI's fallback until then. Delete it and call the library's (passing ``factory`` if it takes it).
    """
    for module in (model, *(m for _, m in model.named_children())):
        cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
        if isinstance(cfg, dict) and _whole_numbers(cfg.get("input_size"), 3):
            return [1, *cfg["input_size"]]
        config = getattr(module, "config", None)
        size = getattr(config, "image_size", None)
        if config is not None and size is not None:
            height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
            return [1, int(getattr(config, "num_channels", 3)), int(height), int(width)]
    if factory and factory.split(":", 1)[0].startswith("torchvision.models"):
        return _torchvision_shape(factory.split(":", 1)[1])
    return None


def _whole_numbers(value: Any, length: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == length and all(isinstance(v, int) for v in value)


def _torchvision_shape(builder: str) -> list[int] | None:
    """torchvision's documented input size for ``builder``: the crop of its default weights' transforms
    (metadata only; nothing is downloaded)."""
    from torchvision import models  # optional dependency: only for a torchvision factory

    try:
        weights = models.get_model_weights(builder).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None
    crop = getattr(weights.transforms(), "crop_size", None)
    if not crop:
        return None
    return [1, 3, crop[0], crop[-1]]


def input_shape_for(args: argparse.Namespace, loaded: LoadedCheckpoint) -> list[int]:
    """``--input-shape``, else the checkpoint's, else the model's documented one; refused when none is known."""
    shape = args.input_shape or loaded.input_shape or default_input_shape(loaded.model, factory_of(loaded.model, args.model))
    if not shape:
        raise ASRError("no input shape: the checkpoint records none and the model documents none (timm's "
                       "pretrained_cfg, a Hugging Face config's image_size, torchvision's weights); pass "
                       "--input-shape, e.g. 1,3,224,224")
    return list(shape)


def prepare_model(args: argparse.Namespace, loaded: LoadedCheckpoint, shape: Sequence[int]) -> tuple[nn.Module, torch.Tensor]:
    """Move the model to ``--device``, check it traces and runs on an input of ``shape``; ``(model, x)``."""
    device = torch_device(args.device)
    model = loaded.model.to(device).eval()
    if loaded.vanilla is not None:
        loaded.vanilla.to(device)
    check_leaf_modules(model, args.leaf_modules)
    trace(model, args.leaf_modules)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is reported as a shape problem
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ASRError(f"the model does not run on an input of shape {list(shape)}: {type(exc).__name__}: {first}; "
                       "pass the shape it expects with --input-shape") from exc
    return model, x
