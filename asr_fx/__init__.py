"""asr-fx: attention-alike structural re-parameterization (ASR) as torch.fx graph passes.

``instrument(model)`` -> train -> ``fuse(model)`` -> ``export_onnx(fused, path, inputs)``.
"""

from asr_fx import attention, stripe
from asr_fx._util import count_parameters
from asr_fx.api import asr_parameters, find_sites, fuse, fusion_report, get_config, instrument
from asr_fx.asr import ASR, NormFusedASR
from asr_fx.checkpoint import load, save
from asr_fx.config import ASRConfig, asr_config
from asr_fx.factory import build
from asr_fx.export import export_onnx
from asr_fx.errors import (
    ASRError,
    CheckpointError,
    DifferentModelError,
    ExportError,
    FactoryError,
    FusionError,
    InputShapeError,
    InvalidOptionError,
    NoSitesError,
    OutputPathError,
    TraceError,
    UnknownAttentionError,
    UnsupportedModelError,
    UsageError,
    VerificationError,
)
from asr_fx.input_shapes import default_input_shape
from asr_fx.passes import Site
from asr_fx.report import FusionReport
from asr_fx.freeze import freeze_attention
from asr_fx.verify import ExportReport, onnx_op_counts, verify_onnx
from asr_fx import testing  # asr_fx.testing.assert_fusion_equivalent, for users' CI

__version__ = "0.1.0"

__all__ = [
    "ASR",
    "ASRConfig",
    "NormFusedASR",
    "ASRError",
    "CheckpointError",
    "DifferentModelError",
    "ExportError",
    "FactoryError",
    "FusionError",
    "FusionReport",
    "InputShapeError",
    "InvalidOptionError",
    "NoSitesError",
    "OutputPathError",
    "Site",
    "TraceError",
    "UnknownAttentionError",
    "UnsupportedModelError",
    "UsageError",
    "VerificationError",
    "ExportReport",
    "asr_config",
    "asr_parameters",
    "build",
    "count_parameters",
    "default_input_shape",
    "export_onnx",
    "load",
    "onnx_op_counts",
    "save",
    "attention",
    "stripe",
    "find_sites",
    "freeze_attention",
    "fuse",
    "fusion_report",
    "get_config",
    "instrument",
    "testing",
    "verify_onnx",
]
