"""Small helpers shared by the library modules: parameter counts, NaN/Inf checks, meta-device tensors.
(Train/eval save-and-restore is ``asr_fx.passes.graph.modes.preserved_training_modes``.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn


def psi_shape_of(net: nn.Module) -> tuple[int, ...]:
    """The ``psi_shape`` an attention network declares (its psi's shape), as a tuple of ints."""
    return tuple(int(d) for d in cast(Sequence[int], net.psi_shape))


def count_parameters(model: nn.Module) -> int:
    """The number of parameter elements of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def non_finite_kind(value: torch.Tensor) -> str | None:
    """``"NaN"`` or ``"Inf"`` when a floating tensor holds one (NaN named first), else ``None``."""
    if not value.is_floating_point() and not value.is_complex():
        return None
    if torch.isfinite(value).all():
        return None
    return "NaN" if torch.isnan(value).any() else "Inf"


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters and buffers that live on the meta device (no values)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in named if t.device.type == "meta"]
