"""Save and restore train/eval modes around work that needs one mode (shape propagation, calibration)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def preserved_training_modes(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``module`` may be switched to eval (or train); afterwards every submodule
    has its own ``training`` flag back, whatever the block did or raised."""
    modes = {m: m.training for m in module.modules()}
    try:
        yield module
    finally:
        for m, mode in modes.items():
            m.training = mode
