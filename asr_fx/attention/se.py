"""Squeeze-and-Excitation (Hu et al., 2018) on psi.

psi form: ``(1, C, 1, 1)``, one pooled descriptor; the GAP step is skipped. ``F`` is
``conv1x1(C -> h) -> ReLU -> conv1x1(h -> C)`` with ``h = max(C // reduction, min_hidden)``
(capped at ``C``); the activation is applied by the ASR block.
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 8) -> None:
        super().__init__()
        hidden = min(channels, max(channels // reduction, min_hidden))
        self.psi_shape = (1, channels, 1, 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(psi)))
