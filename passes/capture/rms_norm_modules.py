"""Capture step: RMS norm modules written out in Python (Llama's, T5's and many hand-written ones) become
one call of an ``nn.RMSNorm`` twin that runs the module's own forward.

Such a module computes ``weight * (x * rsqrt(mean(x**2, -1) + eps))`` in its own spelling (dtype casts,
``x.pow(2)`` or ``x * x``, ``torch.rsqrt`` or ``1 / sqrt``): traced through, it leaves a chain of
elementwise ops that no layer rule reads as a norm, so no site goes after it and no scale folds into it.
A module is taken for one by what it computes, not by its name: no children, no hooks, one parameter
``weight`` of shape ``(C,)``, and on a random probe (before tracing, on the module's own device and dtype)

- its output is ``x / rms(x) * weight`` over the last dimension (within 1e-3: any small ``eps``), and
- its output scales per channel with its weight (``weight * s`` gives ``output * s``): exactly the
  property a fold into the weight relies on. Gemma's ``x * (1 + weight)`` fails it and stays code.

The module is kept one call (a leaf) and, in the traced graph, replaced by an :class:`OwnForwardRMSNorm`
holding the same tensors, whose forward is the module's class's own forward: the same function, exactly.
Its path is recorded as a whole-module twin (:data:`~.plain_layers.WHOLE_MODULE_TWINS`), so the user's
class keeps the site (:mod:`asr_fx.own_model`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from .plain_layers import WHOLE_MODULE_TWINS, CallingRMSNorm, plain_twin


class OwnForwardRMSNorm(CallingRMSNorm):
    """An ``nn.RMSNorm`` to the layer rules whose forward is the forward of the module it stands for."""

    own_forward: Callable[..., torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.own_forward(self, x)


def _candidate(module: nn.Module) -> torch.Tensor | None:
    """The weight of a module shaped like an RMS norm module of its own, else ``None``."""
    if type(module).__module__.startswith("torch.") or isinstance(module, CallingRMSNorm):
        return None  # torch's own layers are leaves with their own rules
    if next(module.children(), None) is not None or next(module.buffers(), None) is not None:
        return None
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    params = dict(module.named_parameters())
    weight = params.get("weight")
    if list(params) != ["weight"] or weight is None or weight.dim() != 1 or weight.numel() < 2:
        return None
    if weight.is_meta or not weight.is_floating_point():
        return None
    return weight


def is_rms_norm_module(module: nn.Module) -> bool:
    """Whether ``module`` computes an RMS norm whose output scales with its weight (see the module docstring)."""
    weight = _candidate(module)
    if weight is None:
        return False
    generator = torch.Generator().manual_seed(0)
    channels = weight.numel()
    x = torch.randn(2, 3, channels, generator=generator, dtype=torch.float64).to(weight)
    s = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5).to(weight)
    forward = type(module).forward
    try:
        with torch.no_grad():
            out = forward(module, x)
            scaled = functional_call(module, {"weight": weight * s}, (x,))
    except Exception:  # noqa: BLE001 - a forward that does not take one tensor is no norm of this kind
        return False
    if not (isinstance(out, torch.Tensor) and isinstance(scaled, torch.Tensor) and out.shape == x.shape):
        return False
    x64, out64 = x.double(), out.double()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True)) * weight.double()
    tolerance = max(1e-3, 8 * torch.finfo(weight.dtype).eps)
    return bool(torch.allclose(out64, expected, rtol=tolerance, atol=tolerance)) and \
        bool(torch.allclose(scaled.double(), out64 * s.double(), rtol=tolerance, atol=tolerance))


def rms_norm_module_paths(model: nn.Module) -> set[str]:
    """The paths of the RMS norm modules of ``model`` (:func:`is_rms_norm_module`), kept one call each."""
    return {name for name, module in model.named_modules() if name and is_rms_norm_module(module)}


def install_rms_norm_twins(gm: fx.GraphModule, paths: set[str]) -> list[str]:
    """Replace each module at ``paths`` that ``gm`` calls by its :class:`OwnForwardRMSNorm` twin, in place;
    returns the paths replaced."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.target in paths}
    done = []
    for path in sorted(called):
        module = gm.get_submodule(path)
        if isinstance(module, CallingRMSNorm):
            continue
        twin: Any = plain_twin(OwnForwardRMSNorm, module, {})
        twin.own_forward = type(module).forward
        twin.normalized_shape, twin.elementwise_affine = (twin.weight.numel(),), True
        twin.__dict__.setdefault("eps", None)
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, twin)
        done.append(path)
    if done:
        gm.meta[WHOLE_MODULE_TWINS] = sorted({*gm.meta.get(WHOLE_MODULE_TWINS, ()), *done})
    return done
