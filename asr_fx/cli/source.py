"""The model a command works on, from the model-source options (:func:`asr_fx.cli.options.add_model_source`).

Imports torch: the command modules import this module only when a command runs. Every check that
costs nothing (the opset, the device, the names) has a function here that the commands call before
loading the model; output paths are checked with :func:`asr_fx.atomic.check_writable`.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

import asr_fx
from asr_fx._util import meta_tensors
from asr_fx.errors import InputShapeError, InvalidOptionError, UnsupportedModelError
from asr_fx.foreign_checkpoints import LoadedCheckpoint, load_checkpoint
from asr_fx.input_shapes import default_input_shape
from asr_fx.partial_capture import is_partial
from asr_fx.passes import trace
from asr_fx.verify import model_dtype


def load_from_args(args: argparse.Namespace, path: Path) -> LoadedCheckpoint:
    """:func:`asr_fx.foreign_checkpoints.load_checkpoint` with the model-source and ASR options."""
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
            raise InvalidOptionError(f"--device {name}: CUDA is not available here (torch.cuda.is_available() is "
                                     f"False); "
                                     "use --device cpu")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InvalidOptionError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)


def check_opset_option(opset: int | None) -> None:
    """Refuse an ``--opset`` no exporter writes, before any work (one older than 18 is tried: torch's
    exporter converts down when it can, and the export refuses the file when not)."""
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not 7 <= opset <= newest:
        raise InvalidOptionError(f"--opset {opset}: ONNX opsets go from 7 to {newest} (the installed onnx's newest); "
                                 "torch's exporter writes 18 and newer, older ones where it can convert the model")


def check_leaf_modules(model: nn.Module, names: Sequence[str] | None) -> None:
    """Refuse ``--leaf-modules`` names that are not module paths of ``model``."""
    if not names:
        return
    paths = [n for n, _ in model.named_modules() if n]
    unknown = [n for n in names if n not in paths]
    if unknown:
        hints = "".join(f"; {n!r}: did you mean {m[0]!r}?" for n in unknown
                        if (m := difflib.get_close_matches(n, paths, n=1)))
        raise InvalidOptionError(f"--leaf-modules: {', '.join(repr(n) for n in unknown)} match(es) no module of the "
                                 f"model "
                                 f"(give module paths as named by model.named_modules(), such as {paths[0]!r}){hints}")


def check_name_counts(input_names: Sequence[str] | None, output_names: Sequence[str] | None, n_inputs: int,
                      n_outputs: int) -> None:
    """Refuse ``--input-names``/``--output-names`` with the wrong number of names, before the export."""
    for option, given, count in (("--input-names", input_names, n_inputs), ("--output-names", output_names, n_outputs)):
        if given is not None and len(given) != count:
            raise InvalidOptionError(f"{option}: {len(given)} name(s) for {count} {option[2:-6]}(s) of the model")
        if given is not None and len(set(given)) != len(given):
            raise InvalidOptionError(f"{option}: each name once, got {','.join(given)}")


def input_shape_for(args: argparse.Namespace, loaded: LoadedCheckpoint) -> list[int]:
    """``--input-shape``, else the checkpoint's, else the model's documented one; refused when none is known."""
    shape = (args.input_shape or loaded.input_shape or default_input_shape(loaded.model)
             or (default_input_shape(loaded.vanilla) if loaded.vanilla is not None else None))  # its own class says
    if not shape:
        raise InputShapeError("no input shape: the checkpoint records none and the model documents none (timm's "
                              "pretrained_cfg, a Hugging Face config's image_size, torchvision's documented sizes); "
                              "pass --input-shape, e.g. 1,3,224,224", shape=None)
    return list(shape)


def prepare_model(args: argparse.Namespace, loaded: LoadedCheckpoint,
                  shape: Sequence[int]) -> tuple[nn.Module, torch.Tensor]:
    """Move the model to ``--device``, check it traces and runs on an input of ``shape``; ``(model, x)``."""
    device = torch_device(args.device)
    meta = meta_tensors(loaded.model)
    if meta:  # .to() would fail with "Cannot copy out of meta tensor"; a checkpoint does not fill them either
        raise UnsupportedModelError(
            f"the model has {len(meta)} parameter(s)/buffer(s) on the meta device ({meta[0]}, ...), which hold no "
            "values: make the --model factory build it on a real device (cpu)", reason="meta")
    model = loaded.model.to(device).eval()
    if loaded.vanilla is not None:
        loaded.vanilla.to(device)
    check_leaf_modules(model, args.leaf_modules)
    if not is_partial(model):  # instrumented part by part: its own forward does not trace, its parts are traced
        trace(model, args.leaf_modules)
    dtype = model_dtype(model)  # an fp16/bf16 model gets an input in its own dtype
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is reported as a shape problem
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "memory" in first.lower():
            raise InputShapeError(f"the model ran out of memory on an input of shape {list(shape)} "
                                  f"({type(exc).__name__}: {first}): pass a smaller --input-shape (batch 1, a smaller "
                                  "image)",
                                  shape=list(shape)) from exc
        raise InputShapeError(f"the model does not run on an input of shape {list(shape)}: {type(exc).__name__}: "
                              f"{first}; pass the shape it expects with --input-shape", shape=list(shape)) from exc
    return model, x
