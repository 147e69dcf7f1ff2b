"""Calls that capture keeps as one opaque call by default: einops, and functions told the training mode.

einops' ``rearrange``/``repeat``/``reduce``/``pack``/``unpack`` and its layers ``Rearrange``/``Reduce`` are
pure data movement (or pooling) whose Python looks up a recipe by the input's rank (``self._multirecipe[
input.ndim]``), which torch.fx cannot trace. They stay one call each: a ``call_function`` of the einops
function, a ``call_module`` of the layer. Equivalence: the call runs einops itself at run time.
Placement reads through none of them (a site is never put behind one; a scale never crosses one).

einops is optional: it is looked at only when the model's code has imported it.

A plain Python function that a forward calls and that takes a ``training`` argument
(``drop_connect(x, p, training=self.training)``, EfficientNet-PyTorch's stochastic depth) also stays one
call (:func:`mode_functions`): traced through, it is a different graph in train and in eval mode, and the
whole block calling it would have to stay opaque; as a call, only its ``training`` argument differs, and
that follows the captured model's mode (:mod:`asr_fx.passes.capture.training_flags`). Equivalence: the
call runs the function itself.
"""

from __future__ import annotations

import inspect
import os
import sys
from types import ModuleType
from typing import Any

import torch
from torch import nn

#: einops layers without parameters (EinMix holds weights: it is traced through)
_EINOPS_LAYERS = frozenset({"Rearrange", "Reduce"})


def opaque_function_modules() -> tuple[ModuleType, ...]:
    """Modules whose functions torch.fx wraps as calls (``autowrap_modules``): einops, when imported."""
    einops = sys.modules.get("einops")
    return (einops,) if einops is not None else ()


def is_opaque_library_layer(module: nn.Module) -> bool:
    """An einops ``Rearrange``/``Reduce`` layer."""
    cls = type(module)
    return cls.__module__.startswith("einops.") and cls.__name__ in _EINOPS_LAYERS


_TORCH_DIR = os.path.join(os.path.dirname(torch.__file__), "")


def _takes_training(fn: Any) -> bool:
    if not inspect.isfunction(fn) or fn.__code__.co_filename.startswith(_TORCH_DIR):
        return False
    return "training" in fn.__code__.co_varnames[:fn.__code__.co_argcount + fn.__code__.co_kwonlyargcount]


def mode_functions(root: nn.Module) -> list[Any]:
    """Plain functions named in a forward of ``root``'s modules that take a ``training`` argument."""
    found: dict[int, Any] = {}
    for cls in {type(m) for m in root.modules()}:
        forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
        code = getattr(forward, "__code__", None)
        if code is None:
            continue
        scope = getattr(forward, "__globals__", {})
        for name in code.co_names:
            fn = scope.get(name)
            if _takes_training(fn):
                found[id(fn)] = fn
    return list(found.values())
