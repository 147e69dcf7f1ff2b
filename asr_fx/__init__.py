"""asr-fx: attention-alike structural re-parameterization (ASR) as torch.fx graph passes.

``instrument(model)`` -> train -> ``fuse(model)`` -> ``export_onnx(fused, path, inputs)``.

The public names below load on first access (PEP 562 ``__getattr__``), so ``import asr_fx`` does not
import torch: ``asr-fx --help`` answers without it. ``from asr_fx import fuse`` works as always.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_ERRORS = (
    "ASRError", "AttentionNetworkError", "CheckpointError", "DifferentModelError", "EquivalenceError",
    "ExportError", "FactoryError", "FusionError", "InputShapeError", "InvalidOptionError", "MissingDependencyError",
    "NoSitesError", "OnnxFileError", "OutputPathError", "StateDictMismatchError", "TraceError",
    "UnfoldableSiteError", "UnknownAttentionError", "UnknownSiteError", "UnsupportedModelError", "UsageError",
    "VanillaModelError", "VerificationError",
)

#: public name -> the module that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(_ERRORS, "asr_fx.errors"),
    "ASR": "asr_fx.asr",
    "BatchNormAffineASR": "asr_fx.asr",
    "ASRConfig": "asr_fx.config",
    "asr_config": "asr_fx.config",
    "FusionReport": "asr_fx.fusion",
    "Site": "asr_fx.passes",
    "ExportReport": "asr_fx.verify",
    "onnx_op_counts": "asr_fx.verify",
    "verify_onnx": "asr_fx.verify",
    "export_onnx": "asr_fx.export",
    "asr_parameters": "asr_fx.api",
    "find_sites": "asr_fx.api",
    "fuse": "asr_fx.api",
    "fusion_report": "asr_fx.api",
    "get_config": "asr_fx.api",
    "instrument": "asr_fx.api",
    "build": "asr_fx.factory",
    "load": "asr_fx.checkpoint",
    "checkpoint_header": "asr_fx.checkpoint",
    "save": "asr_fx.checkpoint",
    "count_parameters": "asr_fx._util",
    "default_input_shape": "asr_fx.input_shapes",
    "freeze_attention": "asr_fx.freeze",
    "save_vanilla_state_dict": "asr_fx.into_vanilla",
}

#: public submodules (``asr_fx.testing.assert_fusion_equivalent`` for users' CI)
_SUBMODULES = ("attention", "stripe", "testing")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name here."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what the names above are, for type checkers and IDEs
    from asr_fx import attention, stripe, testing
    from asr_fx._util import count_parameters
    from asr_fx.api import asr_parameters, find_sites, fuse, fusion_report, get_config, instrument
    from asr_fx.asr import ASR, BatchNormAffineASR
    from asr_fx.checkpoint import checkpoint_header, load, save
    from asr_fx.config import ASRConfig, asr_config
    from asr_fx.errors import (
        ASRError,
        AttentionNetworkError,
        CheckpointError,
        DifferentModelError,
        EquivalenceError,
        ExportError,
        FactoryError,
        FusionError,
        InputShapeError,
        InvalidOptionError,
        MissingDependencyError,
        NoSitesError,
        OnnxFileError,
        OutputPathError,
        StateDictMismatchError,
        TraceError,
        UnfoldableSiteError,
        UnknownAttentionError,
        UnknownSiteError,
        UnsupportedModelError,
        UsageError,
        VanillaModelError,
        VerificationError,
    )
    from asr_fx.export import export_onnx
    from asr_fx.factory import build
    from asr_fx.freeze import freeze_attention
    from asr_fx.fusion import FusionReport
    from asr_fx.input_shapes import default_input_shape
    from asr_fx.into_vanilla import save_vanilla_state_dict
    from asr_fx.passes import Site
    from asr_fx.verify import ExportReport, onnx_op_counts, verify_onnx
