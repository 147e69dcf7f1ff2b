"""Whether asr-fx left the user's model as it was: the check the fuzzers and every zoo sweep run around
``instrument`` and ``fuse``, also when they raise.

A :class:`ModelSnapshot` holds what a pass could change by accident: every state_dict entry (dtype and
value), the module tree with each module's class and training flag, the code of any GraphModule in it,
every hook dict's size (forward, pre, backward, state_dict hooks), the names of each module's attributes
(a flag a library's forward sets, such as transformers' hidden-state capture), and the number of global
module hooks. :func:`what_changed` names the first difference, or returns None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as module_file
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class ModelSnapshot:
    state: dict[str, tuple[torch.dtype, torch.Tensor]]
    modes: list[tuple[str, str, bool]]
    code: list[str | None]
    hooks: dict[str, int]
    attributes: dict[str, frozenset[str]]
    global_hooks: int


def _global_hook_count() -> int:
    return sum(len(v) for k, v in vars(module_file).items()
               if k.startswith("_global_") and "hooks" in k and isinstance(v, dict))


def snapshot(model: nn.Module) -> ModelSnapshot:
    """What :func:`what_changed` compares later (state values are cloned)."""
    return ModelSnapshot(
        state={k: (v.dtype, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()
               if isinstance(v, torch.Tensor)},
        modes=[(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        code=[getattr(m, "code", None) for m in model.modules() if isinstance(m, fx.GraphModule)],
        hooks={f"{n}.{k}": len(v) for n, m in model.named_modules() for k, v in vars(m).items()
               if "hooks" in k and isinstance(v, dict)},
        attributes={n: frozenset(vars(m)) for n, m in model.named_modules()},
        global_hooks=_global_hook_count(),
    )


def what_changed(before: ModelSnapshot, model: nn.Module) -> str | None:
    """The first difference between ``model`` now and ``before``, in words; None where there is none."""
    now = snapshot(model)
    if now.hooks != before.hooks:
        diff = sorted(k for k in set(now.hooks) | set(before.hooks) if now.hooks.get(k) != before.hooks.get(k))
        return f"the model's hooks changed: {diff[:3]}"
    if now.global_hooks != before.global_hooks:
        return f"global module hooks changed: {before.global_hooks} -> {now.global_hooks}"
    if now.attributes != before.attributes:
        name = next(n for n in set(now.attributes) | set(before.attributes)
                    if now.attributes.get(n) != before.attributes.get(n))
        added = sorted(now.attributes.get(name, frozenset()) - before.attributes.get(name, frozenset()))
        removed = sorted(before.attributes.get(name, frozenset()) - now.attributes.get(name, frozenset()))
        return f"attributes of module {name!r} changed: added {added[:3]}, removed {removed[:3]}"
    if now.state.keys() != before.state.keys():
        return f"state_dict keys changed: {sorted(set(now.state) ^ set(before.state))[:3]}"
    for key, (dtype, value) in before.state.items():
        if now.state[key][0] != dtype or not torch.equal(now.state[key][1], value):
            return f"state_dict entry {key!r} changed"
    if now.modes != before.modes:
        return "module tree or training flags changed"
    if now.code != before.code:
        return "GraphModule code changed"
    return None


def output_tensors(model: nn.Module, inputs: Sequence[object]) -> list[torch.Tensor]:
    """Every floating tensor ``model(*inputs)`` returns, in eval mode without gradients (cloned)."""
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    return [t.clone() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@dataclass(frozen=True)
class KeptModel:
    """A model as it was before the passes: its :class:`ModelSnapshot` and what it returned on ``inputs``."""

    model: nn.Module
    snapshot: ModelSnapshot
    outputs: list[torch.Tensor]
    inputs: tuple[object, ...]

    @classmethod
    def take(cls, model: nn.Module, inputs: Sequence[object]) -> KeptModel:
        return cls(model, snapshot(model), output_tensors(model, inputs), tuple(inputs))

    def what_changed(self) -> str | None:
        """:func:`what_changed`, then whether the model still returns the same outputs, exactly."""
        changed = what_changed(self.snapshot, self.model)
        if changed:
            return changed
        now = output_tensors(self.model, self.inputs)
        if len(now) != len(self.outputs) or any(a.shape != b.shape or not torch.equal(a, b)
                                                 for a, b in zip(now, self.outputs)):
            return "its outputs changed"
        return None
