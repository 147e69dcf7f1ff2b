"""The ASR block: ``x * act(F(psi))`` with a learnable constant input ``psi``.

At training time the attention network ``F`` sees ``psi`` instead of ``GAP(x)`` (the paper's
Eq. 4 "without GAP"), so its output ``v`` does not depend on the input: after training ``v`` is a
constant vector and :func:`asr_fx.fuse` folds ``x * v`` into the layer that produced ``x``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hardsigmoid": F.hardsigmoid,
}

PsiInit = float | tuple[str, float]

#: named settings from the paper. ``cnn``: sigmoid, psi = 0.1 (Appendix B.2, ResNet/VGG/...);
#: ``transformer``: tanh, psi and every parameter of the attention network initialised to 1e-3
#: (Appendix B.2, ViT). ``attention_init`` fills the attention network's parameters with a constant.
PRESETS: dict[str, dict[str, Any]] = {
    "cnn": {"activation": "sigmoid", "psi_init": 0.1, "attention_init": None},
    "transformer": {"activation": "tanh", "psi_init": 1e-3, "attention_init": 1e-3},
}

_DEFAULTS = {"activation": "sigmoid", "psi_init": 0.1}


def resolve_preset(preset: str | None, activation: str, psi_init: PsiInit) -> tuple[str, PsiInit, float | None]:
    """``(activation, psi_init, attention_init)`` after applying ``preset`` (``None``: no preset).

    A preset sets all three; an ``activation``/``psi_init`` given beside it must be the default
    or the preset's own value, else this raises (two settings for one knob is a mistake).
    """
    if preset is None:
        return activation, psi_init, None
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    chosen = PRESETS[preset]
    for knob, value in (("activation", activation), ("psi_init", psi_init)):
        if value != _DEFAULTS[knob] and value != chosen[knob]:
            raise ValueError(
                f"preset={preset!r} sets {knob}={chosen[knob]!r}, but {knob}={value!r} was also given; "
                f"drop one of them"
            )
    return chosen["activation"], chosen["psi_init"], chosen["attention_init"]


def fill_parameters(module: nn.Module, value: float) -> None:
    """Set every parameter of ``module`` to the constant ``value`` (the transformer preset's init)."""
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def init_psi(shape: tuple[int, ...], psi_init: PsiInit) -> torch.Tensor:
    """``psi``'s initial value: a constant (the paper's 0.1) or ``("normal", std)``."""
    if isinstance(psi_init, (int, float)):
        return torch.full(shape, float(psi_init))
    kind, value = psi_init
    if kind == "normal":
        return torch.randn(shape) * float(value)
    if kind == "constant":
        return torch.full(shape, float(value))
    raise ValueError(f"psi_init must be a number, ('constant', c) or ('normal', std); got {psi_init!r}")


class ASR(nn.Module):
    """One ASR block at one site.

    Args:
        channels: size of the channel dimension ``x`` is scaled along.
        attention: the attention network ``F``; it takes ``psi`` (shape ``attention.psi_shape``)
            and returns ``channels`` values (any shape), before the activation.
        channel_pos: the channel dimension of ``x`` counted from the right (``-3`` for NCHW,
            ``-1`` for tokens-last); ``v`` is reshaped to broadcast there.
        activation: ``"sigmoid"`` (default), ``"tanh"`` or ``"hardsigmoid"``.
        psi_init: initial ``psi``: a constant (default 0.1) or ``("normal", std)``.
        learnable_psi: ``False`` keeps ``psi`` fixed (a buffer, not a parameter).
    """

    def __init__(
        self,
        channels: int,
        attention: nn.Module,
        *,
        channel_pos: int = -3,
        activation: str = "sigmoid",
        psi_init: PsiInit = 0.1,
        learnable_psi: bool = True,
    ) -> None:
        super().__init__()
        if channel_pos >= 0:
            raise ValueError(f"channel_pos counts from the right and must be negative, got {channel_pos}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.channels = channels
        self.channel_pos = channel_pos
        self.activation = activation
        self.attention = attention
        psi = init_psi(tuple(attention.psi_shape), psi_init)
        if learnable_psi:
            self.psi = nn.Parameter(psi)
        else:
            self.register_buffer("psi", psi)

    @property
    def broadcast_shape(self) -> tuple[int, ...]:
        return (self.channels,) + (1,) * (-self.channel_pos - 1)

    def attention_value(self) -> torch.Tensor:
        """``v = act(F(psi))`` shaped to broadcast over ``x``; the same for every input."""
        v = ACTIVATIONS[self.activation](self.attention(self.psi))
        return v.reshape(self.broadcast_shape)

    def forward(self, x: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """``x * v``; ``v`` is :meth:`attention_value` unless the graph computed it first and passes it
        (:mod:`asr_fx.values_first`)."""
        return x * (self.attention_value() if v is None else v)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, channel_pos={self.channel_pos}, activation={self.activation!r}"


NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_affine_batch_norm(module: Any) -> bool:
    """``module`` is a plain affine ``nn.BatchNorm1d/2d/3d`` (not a subclass with its own forward)."""
    return type(module) in NORM_TYPES and module.affine and module.weight is not None and module.bias is not None


def computes_like_batch_norm(norm: Any) -> bool:
    """``norm(x)`` may be computed by :func:`batch_norm_forward` with other affine parameters: a plain
    affine BatchNorm without forward hooks of its own (a hooked or converted norm, such as the
    ``nn.SyncBatchNorm`` that ``convert_sync_batchnorm`` puts in its place, must be called itself)."""
    return is_affine_batch_norm(norm) and not norm._forward_hooks and not norm._forward_pre_hooks


def batch_norm_forward(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    """What ``norm(x)`` computes, with ``weight``/``bias`` in place of ``norm``'s own affine parameters.

    Follows ``nn.BatchNorm``'s forward exactly: batch statistics in training (and always without
    running stats), ``num_batches_tracked`` counted, ``momentum=None`` as a cumulative average.
    """
    norm._check_input_dim(x)
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    use_batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    keep_stats = not norm.training or norm.track_running_stats
    return F.batch_norm(x, norm.running_mean if keep_stats else None, norm.running_var if keep_stats else None,
                        weight, bias, use_batch_stats, factor, norm.eps)


class NormFusedASR(ASR):
    """An ASR block computed inside the BatchNorm before it: ``BN(x)`` with affine ``weight * v, bias * v``.

    The same function as ``ASR()(bn(x))`` (``(x_hat * w + b) * v = x_hat * (w v) + b v``) in training
    and in eval, but no ``BN(x)`` activation is kept for the backward of ``* v``. The graph calls it
    as ``block(x, bn)``: ``bn`` is the BatchNorm module itself, read by the graph from its original
    path (``norm_path``), so it stays there with its state_dict keys and is not a submodule of this block.
    A ``bn`` that is no longer a plain BatchNorm (converted to ``nn.SyncBatchNorm``, say) or has forward
    hooks is called as it is, then multiplied by ``v``: the ordinary form, so nothing is skipped.
    ``torch.fx`` tracing (``symbolic_trace``, or :func:`asr_fx.fuse` on a copy) also records the
    ordinary form, so a traced graph holds ``bn`` then ``x * v`` whichever form trained.
    """

    def __init__(self, channels: int, attention: nn.Module, norm_path: str, **kwargs: Any) -> None:
        super().__init__(channels, attention, **kwargs)
        self.norm_path = norm_path

    @classmethod
    def from_block(cls, block: ASR, norm_path: str) -> NormFusedASR:
        """The norm-fused form of ``block``: the same attention network and the same psi tensor."""
        fused = cls(block.channels, block.attention, norm_path, channel_pos=block.channel_pos,
                    activation=block.activation, learnable_psi=isinstance(block.psi, nn.Parameter))
        fused.psi = block.psi
        return fused

    def forward(self, x: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm,  # type: ignore[override]
                v: torch.Tensor | None = None) -> torch.Tensor:
        v = self.attention_value() if v is None else v
        if isinstance(x, torch.fx.Proxy) or not computes_like_batch_norm(norm):
            return norm(x) * v  # the ordinary form: traced, or the norm was replaced (SyncBatchNorm) or is hooked
        v = v.reshape(-1)
        return batch_norm_forward(norm, x, norm.weight * v, norm.bias * v)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm={self.norm_path!r}"


def check_attention_output(net: nn.Module, channels: int) -> None:
    """Run ``net`` once on a zero psi (eval mode, no grad) and refuse it unless it returns ``channels`` values."""
    mode = net.training
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(tuple(net.psi_shape)))
    finally:
        net.train(mode)
    if not isinstance(out, torch.Tensor) or out.numel() != channels:
        got = f"{out.numel()} values of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"attention {type(net).__name__} returned {got} for a site of {channels} channels: forward(psi) "
            "must return one value per channel (before the activation)"
        )


def make_site_block(
    channels: int,
    channel_pos: int,
    attention: str | Callable[..., nn.Module],
    *,
    delta: int = 1,
    activation: str = "sigmoid",
    psi_init: PsiInit = 0.1,
    learnable_psi: bool = True,
    attention_kwargs: dict | None = None,
    preset: str | None = None,
) -> nn.Module:
    """The module placed at one site: one :class:`ASR` block, or ``nn.Sequential`` of ``delta`` of them.

    ``preset`` names an entry of :data:`PRESETS` (e.g. ``"transformer"``); see :func:`resolve_preset`.
    """
    from asr_fx import attention as registry

    if delta < 1:
        raise ValueError(f"delta is the number of ASR blocks per site and must be >= 1, got {delta}")
    activation, psi_init, attention_init = resolve_preset(preset, activation, psi_init)

    def one() -> ASR:
        net = registry.create(attention, channels, **(attention_kwargs or {}))
        check_attention_output(net, channels)
        if attention_init is not None:
            fill_parameters(net, attention_init)
        return ASR(channels, net, channel_pos=channel_pos, activation=activation, psi_init=psi_init,
                   learnable_psi=learnable_psi)

    return one() if delta == 1 else nn.Sequential(*(one() for _ in range(delta)))
