"""asr-fx: attention-alike structural re-parameterization (ASR) as torch.fx graph passes.

``instrument(model)`` -> train -> ``fuse(model)`` -> ``export_onnx(fused, path, inputs)``.
"""

from asr_fx import attention, stripe
from asr_fx.api import asr_parameters, find_sites, fuse, fusion_report, get_config, instrument
from asr_fx.asr import ASR, NormFusedASR
from asr_fx.checkpoint import load, save
from asr_fx.factory import build
from asr_fx.export import ExportReport, export_onnx, onnx_op_counts
from asr_fx.errors import (ASRError, CheckpointError, FusionError, NoSitesError, TraceError, VanillaModelError,
                           VerificationError)
from asr_fx.into_vanilla import save_vanilla_state_dict
from asr_fx.passes import Site
from asr_fx.report import FusionReport
from asr_fx.freeze import freeze_attention
from asr_fx import testing  # asr_fx.testing.assert_fusion_equivalent, for users' CI

__version__ = "0.1.0"

__all__ = [
    "ASR",
    "NormFusedASR",
    "ASRError",
    "CheckpointError",
    "FusionError",
    "FusionReport",
    "NoSitesError",
    "Site",
    "TraceError",
    "VanillaModelError",
    "VerificationError",
    "ExportReport",
    "asr_parameters",
    "build",
    "export_onnx",
    "load",
    "onnx_op_counts",
    "save",
    "save_vanilla_state_dict",
    "attention",
    "stripe",
    "find_sites",
    "freeze_attention",
    "fuse",
    "fusion_report",
    "get_config",
    "instrument",
    "testing",
]
