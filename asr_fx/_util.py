"""Small helpers shared by the library modules: parameter counts, train/eval save-and-restore, NaN/Inf checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """The number of parameter elements of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def modes_restored(*models: nn.Module | None) -> Iterator[None]:
    """Remember the train/eval flag of every submodule of ``models`` (``None`` skipped) and restore it on exit."""
    modes = {m: m.training for owner in models if owner is not None for m in owner.modules()}
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


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
