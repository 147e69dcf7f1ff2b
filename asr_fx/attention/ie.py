"""Instance Enhancement (the attention of IEBN, Liang et al., AAAI 2020) on psi.

psi form: ``(1, C, 1, 1)``, one pooled descriptor; the GAP step is skipped. ``F`` is IE's
per-channel linear map ``w_c * psi_c + b_c`` (``2C`` parameters, no mixing across channels).

``weight_init`` (default 1.0) and ``bias_init`` (default 0.0) start ``w`` and ``b``; a weight of
0 would leave psi without a gradient on the first step (``dF/dpsi = w``).
"""

from __future__ import annotations

import torch
from torch import nn


class InstanceEnhancement(nn.Module):
    def __init__(self, channels: int, weight_init: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        self.psi_shape = (1, channels, 1, 1)
        self.weight_init, self.bias_init = float(weight_init), float(bias_init)
        self.weight = nn.Parameter(torch.full((1, channels, 1, 1), self.weight_init))
        self.bias = nn.Parameter(torch.full((1, channels, 1, 1), self.bias_init))

    def reset_parameters(self) -> None:
        """``w`` to ``weight_init`` and ``b`` to ``bias_init``, in place (meta-device init)."""
        with torch.no_grad():
            self.weight.fill_(self.weight_init)
            self.bias.fill_(self.bias_init)

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return psi * self.weight + self.bias
