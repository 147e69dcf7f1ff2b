"""Shape-aware tracing: proxies that carry the value they take on ``example_inputs``.

With ``example_inputs``, :class:`asr_fx.passes.capture.trace.ASRTracer` runs every traced operation on the
example's values as it records it (:class:`ConcreteValues`). Python that needs a concrete value of a
traced expression then gets one, and the graph keeps the expression itself plus a guard:

- ``bool(p)`` (``if x.dim() == 4``, ``if pixel_values.dtype != expected``, ``if w % patch != 0``);
- ``int(p)``, ``float(p)`` (``int(math.sqrt(n))``); not ``__index__``: torch's argument parser would take
  such a proxy for an int (``torch.ones(b, h, w)`` would specialise ``b``), so sizes passed to torch stay symbolic;
- ``len(p)`` and iteration (``(*input_shape, -1)``, ``for img in images``).

Each such value becomes ``torch._assert(<expr> == <value>, ...)`` in the graph: on inputs where Python
would have taken another path (another batch size where forward specialised on it), the captured
model raises instead of computing something else. Arithmetic on sizes that is only passed on to tensor
operations (``x.view(b, -1, c)``) stays symbolic, so the batch dimension stays free where it is only
passed through.

Refused (the usual torch.fx error, so partial capture takes over): values that depend on tensor *data*
(``if x.sum() > 0``, ``.item()``, the size of ``nonzero()``'s result, boolean-mask indexing). A value is
data-dependent when it is a tensor, or computed from one other than through its metadata (shape,
dtype, device, ...), or from a tensor whose shape is data-dependent.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.proxy import Attribute, Proxy
from torch.fx.proxy import TraceError as FxTraceError
from torch.nn.modules import module as module_file
from torch.utils import _pytree as pytree

from .inplace_proxy import InplaceProxy

MISSING = object()

#: tensor attributes and methods that read metadata only (their results do not depend on tensor data)
_META_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "is_sparse",
                              "is_quantized", "is_meta", "is_floating_point", "is_complex"})
_META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex",
                           "get_device", "is_contiguous", "stride", "element_size"})
_META_FUNCTIONS: frozenset[Any] = frozenset((torch.numel, torch.is_floating_point, torch.is_complex,
                                             torch.is_tensor))
#: operations whose result's *shape* depends on tensor data
_DATA_SHAPED = frozenset({"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "nms",
                          "batched_nms", "bincount"})
#: ... when called with this many positional arguments, or with a tensor as the second one
_DATA_SHAPED_WHEN = {"where": 1, "repeat_interleave": "tensor"}


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, (Proxy, Attribute)):
        return fn(value)
    if isinstance(value, tuple):
        mapped = [_map(v, fn) for v in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else tuple(mapped)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_map(value.start, fn), _map(value.stop, fn), _map(value.step, fn))
    return value


def _proxies(value: Any) -> list[Any]:
    found: list[Any] = []
    _map(value, lambda p: found.append(p) or p)  # type: ignore[func-returns-value]
    return found


def tensor_like(value: Any) -> bool:
    """A tensor, or a tuple/list of tensors (``unbind``, ``split``, ``chunk``; a module's ``(output, None)``):
    data whose *shapes* may still be data-independent."""
    if isinstance(value, (tuple, list)) and value and not isinstance(value, torch.Size):
        return all(isinstance(v, torch.Tensor) or v is None or tensor_like(v) for v in value) and \
            any(isinstance(v, torch.Tensor) or tensor_like(v) for v in value)
    return isinstance(value, torch.Tensor)


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


class ConcreteValues:
    """The value each traced node takes on ``example_inputs``, and whether it depends on tensor data."""

    def __init__(self, root: nn.Module, example_inputs: tuple[Any, ...]) -> None:
        self.root = root
        self.inputs = _bind(root, example_inputs)
        self.values: dict[fx.Node, Any] = {}
        self.data_dependent: set[fx.Node] = set()  # non-tensor values computed from tensor data
        self.data_shaped: set[fx.Node] = set()  # tensors whose shape depends on tensor data
        #: True while an operation runs on values: the tracer then lets module calls and parameter reads
        #: through untraced (torch.fx patches ``nn.Module.__call__``/``__getattr__`` while tracing)
        self.running = False

    def value(self, proxy: Any) -> Any:
        if isinstance(proxy, Attribute):
            base = self.value(proxy.root)
            return MISSING if base is MISSING else getattr(base, proxy.attr, MISSING)
        return self.values.get(proxy.node, MISSING) if isinstance(proxy, Proxy) else proxy

    def from_data(self, proxy: Any) -> bool:
        """``proxy``'s value depends on tensor data (a tensor, a value computed from tensor data), or is unknown."""
        if isinstance(proxy, Attribute):
            root = self.value(proxy.root)
            if isinstance(root, torch.Tensor):
                return proxy.attr not in _META_ATTRIBUTES or self.shape_from_data(proxy.root)
            return root is MISSING or self.from_data(proxy.root)
        value = self.value(proxy)
        return value is MISSING or tensor_like(value) or proxy.node in self.data_dependent

    def record(self, node: fx.Node, kind: str, target: Any, args: tuple, kwargs: dict) -> None:
        if kind == "output":
            return
        self.running = True
        try:
            value = self._compute(kind, target, args, kwargs)
        except Exception:  # noqa: BLE001 - an op that does not run on the example: its value stays unknown
            value = MISSING
        finally:
            self.running = False
        if value is MISSING:
            return
        self.values[node] = value
        inputs = _proxies((args, kwargs))
        name = _name(target)
        reads_metadata = (target is sequence_length) or (kind == "call_method" and name in _META_METHODS) or \
            (kind == "call_function"
             and (target in _META_FUNCTIONS or (target is getattr and args[1] in _META_ATTRIBUTES)))
        shaped = any(self.shape_from_data(p) for p in inputs)
        if tensor_like(value):
            if shaped or name in _DATA_SHAPED or self._data_shaped_call(name, args) or \
                    self._mask_index(kind, target, args) or \
                    any(self.from_data(p) and not tensor_like(self.value(p)) for p in inputs):
                self.data_shaped.add(node)
        elif reads_metadata:
            if shaped or any(self.from_data(p) for p in inputs[1:]):
                self.data_dependent.add(node)
        elif any(self.from_data(p) for p in inputs):
            self.data_dependent.add(node)

    def forget_with(self, proxy: Any) -> None:
        """Drop the value of ``proxy``'s node when the proxy is garbage: only a live proxy (or one made from
        it) can ask for it, so the example's activations are freed as the traced forward drops them, as in
        a plain forward, instead of all being held until the trace ends."""
        if proxy.node in self.values and tensor_like(self.values[proxy.node]):
            weakref.finalize(proxy, self.values.pop, proxy.node, None)

    def shape_from_data(self, proxy: Any) -> bool:
        if isinstance(proxy, Attribute):
            return self.shape_from_data(proxy.root)
        return isinstance(proxy, Proxy) and proxy.node in self.data_shaped

    def _data_shaped_call(self, name: str, args: tuple) -> bool:
        when = _DATA_SHAPED_WHEN.get(name)
        if when == "tensor":
            return len(args) > 1 and isinstance(self.value(args[1]), torch.Tensor)
        return when is not None and len(args) == when

    def _mask_index(self, kind: str, target: Any, args: tuple) -> bool:
        if kind != "call_function" or target is not operator.getitem:
            return False
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        values = [self.value(i) for i in index if isinstance(i, (Proxy, Attribute))]
        return any(isinstance(v, torch.Tensor) and v.dtype in (torch.bool, torch.uint8) for v in values)

    def _compute(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.inputs.get(str(target).lstrip("*"), MISSING)
        if kind == "get_attr":
            value: Any = self.root
            for part in str(target).split("."):
                value = getattr(value, part)
            return value
        if any(self.value(p) is MISSING for p in _proxies((args, kwargs))):
            return MISSING
        a, k = _map(args, self.value), _map(kwargs, self.value)
        with torch.no_grad():
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                return self.root.get_submodule(target)(*a, **k)
        return MISSING


def _bind(root: nn.Module, example_inputs: tuple[Any, ...]) -> dict[str, Any]:
    try:
        params = list(inspect.signature(inspect.unwrap(type(root).forward)).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    copies = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, tuple(example_inputs))
    return dict(zip(names, copies))  # copies: an in-place op in forward must not write into the user's inputs


class _ConcreteDunders:
    """Python conversions of a proxy with a known, data-independent value: the value, guarded in the graph."""

    tracer: Any

    def __int__(self) -> int:
        return self.tracer.concrete_value(self, int)

    def __float__(self) -> float:
        return self.tracer.concrete_value(self, float)

    def __len__(self) -> int:
        return self.tracer.concrete_length(self)

    def __getattr__(self, k: str) -> Any:
        return ConcreteAttribute(self, k)  # type: ignore[arg-type]


class ConcreteProxy(_ConcreteDunders, InplaceProxy):
    """A proxy whose tracer knows its value on the example inputs (see the module docstring)."""


class ConcreteAttribute(_ConcreteDunders, Attribute):
    """``proxy.attr`` (``x.shape``, ``x.dtype``) with its value on the example inputs."""


#: a module's own containers, restored by the parameters/buffers they hold, never as attributes
_MODULE_SLOTS = frozenset({"_parameters", "_buffers", "_modules"})


_CONTAINERS = (list, dict, set)


def _attributes(module: nn.Module) -> dict[str, Any]:
    """A module's plain attributes, with list/dict/set values (and subclasses: the hook dicts are OrderedDicts)
    copied: a forward may append to a cache, or register a hook."""
    return {k: (copy.copy(v) if isinstance(v, _CONTAINERS) else v)
            for k, v in vars(module).items() if k not in _MODULE_SLOTS}


def _restore_attributes(module: nn.Module, saved: dict[str, Any]) -> None:
    own = vars(module)
    for key in [k for k in own if k not in _MODULE_SLOTS and k not in saved]:
        del own[key]  # set by the forward (a cache filled on the first call)
    for key, value in saved.items():
        current = own.get(key, _MISSING)
        if isinstance(value, _CONTAINERS) and type(current) is type(value):
            if not _same_items(current, value):  # a container filled in place: same object, old items
                container: Any = current
                container.clear()
                container.update(value) if isinstance(value, (dict, set)) else container.extend(value)
        elif current is not value:
            own[key] = value


_MISSING = object()


def _same_items(current: Any, saved: Any) -> bool:
    """Whether a container holds the very objects it held (by identity: ``==`` on tensor items would compare
    their values, and a cache of tensors, such as EfficientFormer's attention biases, is common)."""
    if len(current) != len(saved):
        return False
    if isinstance(saved, dict):
        return all(k in current and current[k] is v for k, v in saved.items())
    if isinstance(saved, list):
        return all(a is b for a, b in zip(current, saved))
    return {id(v) for v in current} == {id(v) for v in saved}


@contextlib.contextmanager
def state_kept(model: nn.Module) -> Iterator[None]:
    """The model as it was after the block: buffers (BatchNorm statistics a train-mode trace would update),
    every module's plain attributes (a forward that caches ``self.shape``/``self.anchors`` on its first call
    would keep a tracer's proxy, or the example's value; a flag a forward sets), its hooks of every kind and
    torch's global module hooks (a forward that registers hooks on its first call, as transformers' output
    capture does, would add another set on each trace) and the RNG state."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    attributes = [(m, _attributes(m)) for m in model.modules()]
    global_hooks = [(d, copy.copy(d)) for d in _global_hook_dicts()]
    rng = torch.random.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, saved_attributes in attributes:
            _restore_attributes(m, saved_attributes)
        for hooks, saved_hooks in global_hooks:
            if not _same_items(hooks, saved_hooks):
                hooks.clear()
                hooks.update(saved_hooks)
        torch.random.set_rng_state(rng)


def _global_hook_dicts() -> list[dict[Any, Any]]:
    """torch's global module hooks (``register_module_forward_hook`` and friends)."""
    return [v for k, v in vars(module_file).items() if k.startswith("_global_") and "hooks" in k
            and isinstance(v, dict)]


def sequence_length(value: Any) -> int:
    """``len(value)``, as a function the tracer records (``len`` of a proxy cannot be)."""
    return len(value)


def guard_message(node: fx.Node, value: Any) -> str:
    return (f"asr-fx captured this model for inputs where `{node.name}` is {value!r}, as on its example_inputs "
            "(forward needs it as a Python value); these inputs differ there. Instrument with example_inputs "
            "like these inputs")


def refuse(what: str, reason: str = "values") -> FxTraceError:
    """torch.fx's refusal of Python control flow on a traced value, saying why: ``"values"`` (it depends on
    tensor values), ``"shapes"`` (only on shapes and dtypes, unknown without example inputs) or ``"unknown"``
    (its value could not be computed on the example inputs)."""
    why = {
        "values": f"{what} depends on tensor values, not only on shapes and dtypes",
        "shapes": f"{what} depends on input shapes or dtypes only, which tracing without example_inputs does not "
                  "know: pass example_inputs=(...) and asr-fx captures it shape-aware, guarded in the graph",
        "unknown": f"{what} could not be computed on the example_inputs: an operation before it did not run "
                   "on them",
    }[reason]
    return FxTraceError(f"symbolically traced variables cannot be used as inputs to control flow ({why})")


_SHAPE_ARITHMETIC = frozenset({operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                               operator.truediv, operator.mod, operator.pow, operator.neg, operator.eq, operator.ne,
                               operator.lt, operator.le, operator.gt, operator.ge, operator.not_, operator.and_,
                               operator.or_, getattr, sequence_length})


def metadata_only(value: Any) -> bool:
    """Whether a traced value is computed from tensors' metadata only (``x.shape[-1] % 8``, ``x.dim() == 4``),
    judged from the graph alone (no example values)."""
    if isinstance(value, Attribute):
        return value.attr in _META_ATTRIBUTES or metadata_only(value.root) and not isinstance(value.root, Proxy)
    if not isinstance(value, Proxy):
        return not isinstance(value, torch.Tensor)
    return _node_metadata_only(value.node)


def _node_metadata_only(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _META_ATTRIBUTES or _node_metadata_only(node.args[0])  # type: ignore[arg-type]
    if node.op == "call_function" and (node.target in _SHAPE_ARITHMETIC or node.target in _META_FUNCTIONS):
        inputs = node.all_input_nodes
        return bool(inputs) and all(_node_metadata_only(n) for n in inputs)
    return False
