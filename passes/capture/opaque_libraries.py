"""Library calls that capture keeps as one opaque call by default: einops.

einops' ``rearrange``/``repeat``/``reduce``/``pack``/``unpack`` and its layers ``Rearrange``/``Reduce`` are
pure data movement (or pooling) whose Python looks up a recipe by the input's rank (``self._multirecipe[
input.ndim]``), which torch.fx cannot trace. They stay one call each: a ``call_function`` of the einops
function, a ``call_module`` of the layer. Equivalence: the call runs einops itself at run time.
Placement reads through none of them (a site is never put behind one; a scale never crosses one).

einops is optional: it is looked at only when the model's code has imported it.
"""

from __future__ import annotations

import sys
from types import ModuleType

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
