"""The output form of a module-form site: the module's class swapped for a subclass whose ``forward`` is the
class's own, then the ASR block on the output.

Why not a forward hook: torch.fx (``symbolic_trace``, torchvision's and timm's feature extraction, any
``Tracer``) records a ``torch.nn`` layer as one opaque ``call_module`` and never runs its hooks while tracing:
the traced GraphModule computes the block only because it calls the hooked layer, its graph holds neither
the block's operations nor its parameters (its ``parameters()``, ``state_dict()``, optimizer and DDP miss
``asr.*``), and graph rewrites (conv-BN fusion) drop the block silently. The swapped class is not a
``torch.nn`` leaf (its ``__module__`` is this module), so a tracer calls its ``forward``, which records

    call_module <path>(*args, _asr_fx_vanilla=True)   # the layer's own function, still one node
    <the block's operations on that output>            # with get_attr asr.<key>.* of the model's ``asr``

and at run time ``_asr_fx_vanilla=True`` makes that node compute the class's own forward only. A tracer that
keeps the module a leaf anyway (``leaf_modules`` by class) calls the module, whose forward applies the block:
the same function either way.

The swap keeps ``isinstance``, ``__name__``, parameters, buffers and state_dict keys; ``copy.deepcopy`` and
pickling rebuild the subclass from the original class (:meth:`ASROutput.__reduce_ex__`). A no-op pre-hook
stays on the module (:class:`FastPathGuard`) so that fused fast paths that skip submodules' forwards unless
a hook is attached (``nn.TransformerEncoderLayer`` in eval) take the ordinary path, as with a hook.

Applying a block at an output (:class:`ASRHook`, also the forward hook of models pickled by earlier versions)
and the values :class:`~asr_fx.passes.forms.module_form.HoistValues` computes ahead live here too.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils.hooks import RemovableHandle

from asr_fx.errors import ASRError

from .asr_blocks import ASR

#: ``module.__dict__`` key of the callable ``(module, args, output) -> output with the block applied``
APPLY = "_asr_output"
#: ``module.__dict__`` key of the block of a BatchNorm in the BN-affine form (:mod:`.module_form`)
BN_BLOCK = "_asr_block"
#: the keyword argument a traced ``call_module`` node passes so that the module computes its own forward only
VANILLA = "_asr_fx_vanilla"
_FORMS: dict[type, type] = {}
#: ``block.__dict__`` key of the ``v`` :class:`asr_fx.passes.forms.module_form.HoistValues` computed
_VALUE = "_asr_value"


class ASRHook:
    """Forward hook ``output -> block(output)``; with ``index``, only ``output[index]`` of a tuple is scaled.

    A plain class (not a closure) so that ``copy.deepcopy`` and pickling of the model keep it."""

    def __init__(self, block: nn.Module, index: int | None = None) -> None:
        self.block = block
        self.index = index

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        if self.index is None:
            return _scaled(self.block, output)  # type: ignore[arg-type]
        if isinstance(output, torch.fx.Proxy):  # traced: its length is not known, but that of MHA's is
            if not isinstance(module, nn.MultiheadAttention):
                raise ASRError(f"torch.fx cannot split the tuple output of {type(module).__name__} whose element "
                               f"[{self.index}] an ASR block scales; asr_fx.fuse(model) first, then trace")
            items = [output[i] for i in range(2)]  # type: ignore[index]
            return tuple(_scaled(self.block, x) if i == self.index else x for i, x in enumerate(items))
        items = list(output)  # type: ignore[call-overload]
        items[self.index] = _scaled(self.block, items[self.index])
        return type(output)(items) if isinstance(output, tuple) and type(output) is not tuple else tuple(items)

    def __repr__(self) -> str:
        return f"ASRHook(index={self.index})"


class _Held:
    """A hoisted ``v`` with what it was computed from; copies and pickles of the model get none
    (a tensor in the middle of an autograd graph cannot be deep-copied, and is not state)."""

    def __init__(self, v: torch.Tensor | None = None, stamp: tuple = (), live: bool = False) -> None:
        self.v, self.stamp, self.live = v, stamp, live

    def __deepcopy__(self, memo: dict) -> _Held:
        return _Held()

    def __reduce__(self) -> tuple:
        return (_Held, ())


def _stamp(block: nn.Module) -> tuple:
    """What ``v`` depends on: each parameter/buffer of ``block`` (its storage and in-place version)."""
    return tuple((t.data_ptr(), t._version) for t in (*block.parameters(), *block.buffers()))


def _value(block: nn.Module) -> torch.Tensor | None:
    """The ``v`` :class:`HoistValues` computed for ``block``, when this call belongs to that forward (or to
    its recomputation by gradient checkpointing, inside the backward) and ``block`` has not changed since."""
    held = block.__dict__.get(_VALUE)
    if held is None or held.v is None:
        return None
    if torch.compiler.is_compiling():  # compiled: the value of this forward only (no data pointers to compare)
        return held.v if held.live else None
    if not (held.live or torch._C._current_graph_task_id() != -1) or held.stamp != _stamp(block):
        return None
    return held.v


def _scaled(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.fx.Proxy):  # traced: ``v`` from the block, ``x * v`` recorded in the calling module
        blocks = list(block) if isinstance(block, nn.Sequential) else [block]  # (a feature extractor's node
        if all(isinstance(b, ASR) for b in blocks):  # named after the site's module is then the scaled value)
            for b in blocks:
                x = x * b.attention_value()
            return x
        return block(x)
    v = _value(block)
    return block(x) if v is None else block(x, v)


class ASROutput:
    """Mixin of the output form (see the module docstring); ``_asr_base`` is the class it was made from."""

    _asr_base: type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        vanilla = kwargs.pop(VANILLA, False)
        tracing = not torch.compiler.is_compiling() and is_fx_symbolic_tracing()  # else no walk over the arguments
        proxy = _first_proxy(args, kwargs) if tracing else None
        if proxy is not None:  # traced: the layer's own call as one node, then the block's operations
            tracer = proxy.tracer
            path = tracer.path_of_module(self)  # type: ignore[attr-defined]
            out = tracer.create_proxy("call_module", path, args, {**kwargs, VANILLA: True})
        else:
            out = super().forward(*args, **kwargs)  # type: ignore[misc]
        apply = self.__dict__.get(APPLY)
        return out if vanilla or apply is None else apply(self, args, out)

    def extra_repr(self) -> str:
        own = super().extra_repr()  # type: ignore[misc]
        return f"{own}, asr=v" if own else "asr=v"

    def __reduce_ex__(self, protocol: Any) -> Any:
        reduced = super().__reduce_ex__(protocol)
        return (_rebuilt, (type(self)._asr_base,), *reduced[2:])


def _first_proxy(args: tuple, kwargs: dict) -> torch.fx.Proxy | None:
    found: list[torch.fx.Proxy] = []
    torch.fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, torch.fx.Proxy) else None)
    return found[0] if found else None


def _rebuilt(base: type) -> nn.Module:
    """An empty instance of ``base``'s output form, for unpickling and ``copy.deepcopy``."""
    return object.__new__(output_form_class(base))


def output_form_class(base: type) -> type:
    """The output form of ``base`` (one class per base): named like it, not a ``torch.nn`` leaf for torch.fx."""
    if base not in _FORMS:
        def body(namespace: dict[str, Any]) -> None:
            namespace.update(__module__=__name__, __qualname__=base.__qualname__, _asr_base=base,
                             __doc__=f"{base.__qualname__} with an ASR block on its output (asr_fx output form).")
        _FORMS[base] = types.new_class(base.__name__, (ASROutput, base), exec_body=body)
    return _FORMS[base]


def bypassed(module: nn.Module) -> bool:
    """``module``'s forward was replaced on the instance by another of its methods (``m.forward = m.forward_fuse``,
    as ultralytics' own ``fuse()`` does): calls skip the output form's forward, and the block with it."""
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "__self__", None) is module and \
        getattr(forward, "__func__", None) is not ASROutput.forward


class FastPathGuard:
    """A forward pre-hook that does nothing: see the module docstring."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        return None


def swap_in(module: nn.Module, apply: Callable[[nn.Module, tuple, Any], Any]) -> RemovableHandle:
    """Put ``module`` in the output form with ``apply``; returns the guard hook's handle."""
    module.__class__ = output_form_class(type(module))
    module.__dict__[APPLY] = apply
    return module.register_forward_pre_hook(FastPathGuard())


def swap_out(module: nn.Module) -> Any:
    """Undo :func:`swap_in` on ``module`` (its class back when nothing else swapped it since); returns the
    ``apply`` it held."""
    apply = module.__dict__.pop(APPLY, None)
    if type(module).__dict__.get("_asr_base") is not None:
        module.__class__ = type(module)._asr_base  # type: ignore[attr-defined]
    for handle_id, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, FastPathGuard):
            del module._forward_pre_hooks[handle_id]
    return apply


def carries_block(module: nn.Module) -> bool:
    """``module`` applies an ASR block itself: the output form, or the BN-affine form of a BatchNorm."""
    return APPLY in module.__dict__ or BN_BLOCK in module.__dict__


def traced_output_forms(gm: torch.fx.GraphModule) -> bool:
    """``gm`` (a GraphModule traced from a model with output forms, whose graph holds the blocks' operations) with
    each output-form module put back to its class and the ``_asr_fx_vanilla`` argument dropped from its calls,
    in place: the graph form of the same function. Returns whether there were any. Raises :class:`ASRError`
    when ``gm`` calls a module that carries a block as a whole (a tracer kept it a leaf): that block is not in
    the graph."""
    carrying = {name for name, m in gm.named_modules() if carries_block(m)}
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in carrying]
    whole = sorted({str(n.target) for n in calls if not n.kwargs.get(VANILLA)})
    if whole:
        raise ASRError(f"this GraphModule calls {whole[:3]} as a whole, layers that carry an ASR block (the tracer "
                       "kept them leaves), so its graph does not hold those blocks. Way out: asr_fx.fuse the "
                       "instrumented model itself, then trace the fused model")
    forms = [m for m in gm.modules() if isinstance(m, ASROutput) and APPLY in m.__dict__]
    for node in calls:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != VANILLA}
    for module in forms:
        swap_out(module)
    gm.recompile()
    return bool(forms)
