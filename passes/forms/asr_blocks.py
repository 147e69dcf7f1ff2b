"""The ASR block modules the passes insert and recognise: :class:`ASR` (``x * act(F(psi))``) and
its BatchNorm-affine training form :class:`BatchNormAffineASR`, with the BatchNorm forward the latter uses.

At training time the attention network ``F`` sees a learnable ``psi`` instead of ``GAP(x)`` (the
paper's Eq. 4 "without GAP"), so its output ``v`` does not depend on the input: after training ``v``
is a constant vector and :func:`asr_fx.fuse` folds ``x * v`` into the layer that produced ``x``.
Public as :mod:`asr_fx.asr` (``asr_fx.ASR``, ``asr_fx.BatchNormAffineASR``); here so that the passes need
nothing above them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from asr_fx.errors import InvalidOptionError

from ..graph.op_tables import BATCH_NORM_CLASSES

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hardsigmoid": F.hardsigmoid,
}

PsiInit = float | tuple[str, float]


def fill_psi_(psi: torch.Tensor, psi_init: PsiInit) -> torch.Tensor:
    """Set ``psi`` in place (any device, no grad) to its initial value: a constant (the paper's 0.1),
    ``("constant", c)`` or ``("normal", std)`` (drawn by ``normal_`` from the generator of ``psi``'s
    device); returns ``psi``."""
    if isinstance(psi_init, (int, float)) and not isinstance(psi_init, bool):
        kind, value = "constant", psi_init
    elif isinstance(psi_init, (tuple, list)) and len(psi_init) == 2 and psi_init[0] in ("normal", "constant"):
        kind, value = psi_init
    else:
        raise InvalidOptionError(f"psi_init must be a number, ('constant', c) or ('normal', std); got {psi_init!r}")
    with torch.no_grad():
        if kind == "normal":
            psi.normal_(0.0, float(value))
        else:
            psi.fill_(float(value))
    return psi


def init_psi(shape: tuple[int, ...], psi_init: PsiInit) -> torch.Tensor:
    """``psi``'s initial value: a constant (the paper's 0.1) or ``("normal", std)``, as a new tensor."""
    return fill_psi_(torch.empty(shape), psi_init)


def _fill_own_parameters(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.fill_(value)


def fill_attention(net: nn.Module, value: float) -> None:
    """Set every parameter of the attention network ``net`` to ``value`` (the transformer preset's 1e-3), and
    make each of its submodules that owns parameters reset to that value: its ``reset_parameters`` becomes
    the fill, so a meta-device init loop (``for m in model.modules(): m.reset_parameters()``, in any order)
    gives the same values as the fill did."""
    for module in net.modules():
        if next(module.parameters(recurse=False), None) is not None:
            _fill_own_parameters(module, value)
            module.reset_parameters = functools.partial(_fill_own_parameters, module, float(value))


def reset_attention(net: nn.Module) -> None:
    """Re-initialise an attention network as its constructor did: its own ``reset_parameters()`` (every
    built-in network has one), else that of each submodule that has one (``nn.Conv2d``/``nn.Linear``
    defaults; a fill installed by :func:`fill_attention` in either case)."""
    reset = getattr(net, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    for module in net.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not net and callable(reset):
            reset()


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
        attention_init: a constant every parameter of ``attention`` starts at (the transformer preset's
            1e-3); ``None`` keeps the network's own init.

    :meth:`reset_parameters` sets ``psi`` and the attention network back to these inits, on whatever
    device they are: a model instrumented on the meta device, then ``to_empty``, then the usual
    ``reset_parameters`` loop, starts as one instrumented on a real device.
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
        attention_init: float | None = None,
    ) -> None:
        super().__init__()
        if channel_pos >= 0:
            raise InvalidOptionError(f"channel_pos counts from the right and must be negative, got {channel_pos}")
        if activation not in ACTIVATIONS:
            raise InvalidOptionError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.channels = channels
        self.channel_pos = channel_pos
        self.activation = activation
        self.attention = attention
        self.psi_init = tuple(psi_init) if isinstance(psi_init, list) else psi_init
        self.attention_init = None if attention_init is None else float(attention_init)
        if self.attention_init is not None:
            fill_attention(attention, self.attention_init)
        psi = init_psi(tuple(attention.psi_shape), psi_init)
        if learnable_psi:
            self.psi = nn.Parameter(psi)
        else:
            self.register_buffer("psi", psi)

    def reset_parameters(self) -> None:
        """``psi`` to ``psi_init`` and the attention network to its init (``attention_init`` when set), in place."""
        reset_attention(self.attention)  # first, as the constructor draws: the same seed gives the same block
        fill_psi_(self.psi, self.psi_init)

    @property
    def broadcast_shape(self) -> tuple[int, ...]:
        return (self.channels,) + (1,) * (-self.channel_pos - 1)

    def attention_value(self) -> torch.Tensor:
        """``v = act(F(psi))`` shaped to broadcast over ``x``; the same for every input."""
        v = ACTIVATIONS[self.activation](self.attention(self.psi))
        return v.reshape(self.broadcast_shape)

    def forward(self, x: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """``x * v``; ``v`` is :meth:`attention_value` unless the graph computed it first and passes it
        (:mod:`asr_fx.passes.forms.hoist_attention_values`)."""
        return x * (self.attention_value() if v is None else v)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, channel_pos={self.channel_pos}, activation={self.activation!r}"


def is_affine_batch_norm(module: Any) -> bool:
    """``module`` is a plain affine ``nn.BatchNorm1d/2d/3d`` (not a subclass with its own forward)."""
    return type(module) in BATCH_NORM_CLASSES and module.affine and module.weight is not None and module.bias is not None


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


class BatchNormAffineASR(ASR):
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
    def from_block(cls, block: ASR, norm_path: str) -> BatchNormAffineASR:
        """The BN-affine form of ``block``: the same attention network and the same psi tensor."""
        fused = cls(block.channels, block.attention, norm_path, channel_pos=block.channel_pos,
                    activation=block.activation, learnable_psi=isinstance(block.psi, nn.Parameter),
                    psi_init=getattr(block, "psi_init", 0.1))
        fused.psi = block.psi
        fused.attention_init = getattr(block, "attention_init", None)
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
