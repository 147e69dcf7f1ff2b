"""Style-based Recalibration Module (Lee et al., ICCV 2019) on psi.

psi form: ``(1, C, 2)``: SRM's style pooling gives a mean and a standard deviation per channel,
so psi holds one learnable (mean, std) pair per channel. Nothing is pooled and no standard
deviation is ever computed (an unbiased std over psi's single element per channel would be NaN):
psi *is* the style vector.

``F`` is SRM's style integration: a channel-wise fully connected layer ``z_c = w_c . psi_c``
(``2C`` weights, no bias), then a per-channel affine ``gamma_c * z_c + beta_c`` (``2C``) in place
of SRM's BatchNorm. Why not the BatchNorm: in training mode it would normalise each channel over a
batch of one value (PyTorch refuses; mathematically the output is ``beta`` and psi's gradient is
zero), so the only honest form is the one BatchNorm has at inference, an affine map. The parameter
count equals SRM's (``4C``, ``1024`` for ``C = 256``); SRM's running statistics are not needed.

``cfc_init`` (default 0.5): SRM's reference code starts the channel-wise weights at 0; with a
constant input that would leave psi without a gradient on the first step, so the default is
non-zero. Pass ``cfc_init=0.0`` for the reference's start.
"""

from __future__ import annotations

import torch
from torch import nn


class StyleRecalibration(nn.Module):
    def __init__(self, channels: int, cfc_init: float = 0.5) -> None:
        super().__init__()
        self.channels = channels
        self.psi_shape = (1, channels, 2)
        self.cfc_init = float(cfc_init)
        self.cfc = nn.Parameter(torch.full((channels, 2), self.cfc_init))
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def reset_parameters(self) -> None:
        """``cfc`` to ``cfc_init``, ``gamma`` to 1, ``beta`` to 0, in place (meta-device init)."""
        with torch.no_grad():
            self.cfc.fill_(self.cfc_init)
            self.gamma.fill_(1.0)
            self.beta.fill_(0.0)

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        z = (psi * self.cfc).sum(dim=-1)  # (1, C): style integration, channel by channel
        return (z * self.gamma + self.beta).reshape(1, self.channels, 1, 1)
