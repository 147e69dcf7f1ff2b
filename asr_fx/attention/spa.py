"""Spatial Pyramid Attention (SPANet, Guo et al., ICME 2020) on psi.

psi form: ``(1, C, P)`` with ``P = sum(s * s for s in scales)``: SPA average-pools each channel
to ``s x s`` cells at every scale ``s`` (default ``(1, 2, 4)``, so ``P = 1 + 4 + 16 = 21``), and
psi holds one learnable entry per pooled cell, scale after scale in row-major cell order. The
pooling is skipped.

``F`` is SPA's excitation on the flattened pyramid: ``linear(C*P -> h) -> ReLU -> linear(h -> C)``
without biases, ``h = round(C / reduction)``, ``reduction = 16``, at least 1 (``min_hidden`` sets
a floor, ``hidden`` the width outright; see :mod:`asr_fx.attention._width`); for ``C = 256`` that
is ``5376 * 16 + 16 * 256 = 90112`` parameters (plus ``256 * 21`` in psi).
"""

from __future__ import annotations

import torch
from torch import nn

from asr_fx.errors import InvalidOptionError

from ._width import PerChannel, hidden_width


class SpatialPyramidAttention(nn.Module):
    def __init__(self, channels: int, scales: tuple[int, ...] = (1, 2, 4), reduction: float = 16,
                 min_hidden: int = 1, hidden: PerChannel = None) -> None:
        super().__init__()
        if not scales or any(int(s) < 1 for s in scales):
            raise InvalidOptionError(f"SPA's scales are pooled grid sizes >= 1, got {scales!r}")
        self.channels = channels
        self.scales = tuple(int(s) for s in scales)
        cells = sum(s * s for s in self.scales)
        self.hidden = hidden_width(channels, reduction, min_hidden, hidden)
        self.psi_shape = (1, channels, cells)
        self.fc1 = nn.Linear(channels * cells, self.hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(self.hidden, channels, bias=False)

    def reset_parameters(self) -> None:
        """Each layer back to its own init, in the order the constructor made them (meta-device init)."""
        for layer in (self.fc1, self.fc2):
            layer.reset_parameters()

    def resolved_kwargs(self) -> dict[str, int]:
        """The keyword arguments that rebuild this network's shapes whatever the defaults are."""
        return {"hidden": self.hidden}

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(psi.reshape(1, -1)))).reshape(1, self.channels, 1, 1)
