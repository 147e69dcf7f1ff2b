"""Save and restore train/eval modes around work that needs one mode (shape propagation, calibration,
verification, export). The one such helper: the library modules in asr_fx/ use it too."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def preserved_training_modes(*modules: nn.Module | None) -> Iterator[None]:
    """Within the block the ``modules`` (``None`` skipped) may be switched to eval (or train);
    afterwards every submodule of each has its own ``training`` flag back, whatever the block did or raised."""
    modes = {m: m.training for owner in modules if owner is not None for m in owner.modules()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
