"""What a failed trace says: the module it failed in, the user's line (not torch's, not asr-fx's), and the way
out (keep that module as one call, or pass example inputs where a shape decided the branch)."""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
from torch import nn

from asr_fx.errors import TraceError

_TORCH_DIR = os.path.join(os.path.dirname(torch.__file__), "")
_THIS_DIR = os.path.join(os.path.dirname(__file__), "")


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch and asr-fx: the user's line."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith((_TORCH_DIR, _THIS_DIR)):
            return frame
    return frames[-1] if frames else None


def trace_error(model: nn.Module, tracer: Any, exc: BaseException) -> TraceError:
    """The :class:`TraceError` for ``exc`` raised while ``tracer`` traced ``model``."""
    where = tracer.module_stack_names[-1] if tracer.module_stack_names else ""
    module = model.get_submodule(where) if where else model
    frame = user_frame(exc)
    line = f" at {frame.filename}:{frame.lineno} (`{(frame.line or '').strip()}`)" if frame else ""
    label = f"`{where}` ({type(module).__name__})" if where else f"the model ({type(model).__name__})"
    hint = (
        f"pass leaf_modules=[{where!r}] (or its class {type(module).__name__}) to keep it as one opaque call"
        if where
        else "make forward traceable (no data-dependent Python control flow), or trace a submodule"
    )
    if "tracing without example_inputs" in str(exc):  # a shape condition: example inputs settle it
        hint = "pass example_inputs=(...)" + (f", or {hint}" if where else "")
    return TraceError(f"torch.fx could not trace {label}{line}: {type(exc).__name__}: {exc}. Way out: {hint}.",
                      module=where or None, module_class=type(module).__name__)
