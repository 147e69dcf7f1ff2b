"""A CIFAR ResNet written the way the ASR authors describe theirs, to hold asr-fx to it.

Written here from the paper and the issue's description (not from the authors' code):

- ``AuthorsResNet(depth)``: a CIFAR ResNet of ``depth = 9n + 2`` with Bottleneck blocks
  (``conv1 1x1 -> bn1 -> relu -> conv2 3x3 -> bn2 -> relu -> conv3 1x1 -> bn3``, expansion 4,
  16/32/64 planes, a 1x1 conv + BN downsample), ``AvgPool2d(8)`` and ``view(x.size(0), -1)``.
- ``asr=True``: ``bn3`` is an :class:`ASRBatchNorm2d`: BN, then ``x * sigmoid(F(psi))`` with
  ``psi`` a learnable ``(1, C, 1, 1)`` starting at 0.1 (Appendix B.2) and ``F`` an SE of
  ``round(C / 16)`` hidden units. ``switch_to_deploy()`` folds ``v`` into bn3's affine (Eq. 7).
- ``se=True``: an SE block after bn3, written as ``pool -> view(x.size(0), -1) -> fc1 -> relu ->
  fc2 -> sigmoid -> view(b, c, 1, 1)`` and applied gate first, ``attention_weights * out``.
  Both flags: the paper's "ASR(SE) + SE".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def se_hidden(channels: int, reduction: int = 16) -> int:
    return max(round(channels / reduction), 1)


class SEWeights(nn.Module):
    """An SE block's gate for a feature map: ``(b, c, 1, 1)`` weights in (0, 1)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = se_hidden(channels, reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(x.size(0), -1)
        y = self.sigmoid(self.fc2(self.relu(self.fc1(y))))
        return y.view(b, c, 1, 1)


class PsiSE(nn.Module):
    """The SE network on psi: ``fc1 -> relu -> fc2`` on the flattened vector (no pooling)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = se_hidden(channels, reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(psi.view(1, -1)))).view(psi.shape)


class ASRBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm, then the ASR scale ``sigmoid(F(psi))``; ``switch_to_deploy`` folds it into the affine."""

    def __init__(self, num_features: int, psi_init: float = 0.1, reduction: int = 16) -> None:
        super().__init__(num_features)
        self.psi = nn.Parameter(torch.full((1, num_features, 1, 1), psi_init))
        self.attention = PsiSE(num_features, reduction)
        self.deployed = False

    def attention_value(self) -> torch.Tensor:
        return torch.sigmoid(self.attention(self.psi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BN's own computation, spelled out: ``super().forward(x)`` checks ``x.dim()`` in a Python
        # ``if``, which torch.fx cannot trace through in a subclass
        out = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                           self.momentum, self.eps)
        if self.deployed:
            return out
        return out * self.attention_value()

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        v = self.attention_value().view(-1)
        self.weight.mul_(v)
        self.bias.mul_(v)
        del self.psi, self.attention
        self.deployed = True


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, asr: bool = False, se: bool = False) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, kernel_size=1, bias=False)
        self.bn3 = ASRBatchNorm2d(width) if asr else nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.se = SEWeights(width) if se else None
        self.downsample = None
        if stride != 1 or inplanes != width:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, width, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            attention_weights = self.se(out)
            out = attention_weights * out
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class AuthorsResNet(nn.Module):
    def __init__(self, depth: int = 164, num_classes: int = 100, asr: bool = False, se: bool = False) -> None:
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"depth must be 9n + 2 (11, 20, ..., 164), got {depth}")
        n = (depth - 2) // 9
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1, asr, se)
        self.layer2 = self._make_layer(32, n, 2, asr, se)
        self.layer3 = self._make_layer(64, n, 2, asr, se)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int, asr: bool, se: bool) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(Bottleneck(self.inplanes, planes, stride if i == 0 else 1, asr, se))
            self.inplanes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)

    def switch_to_deploy(self) -> None:
        for m in self.modules():
            if isinstance(m, ASRBatchNorm2d) and not m.deployed:
                m.switch_to_deploy()


def authors_resnet(depth: int = 11, num_classes: int = 10, asr: bool = False, se: bool = False) -> AuthorsResNet:
    """The factory the CLI test names with ``--model fidelity_models:authors_resnet``."""
    return AuthorsResNet(depth, num_classes, asr, se)
