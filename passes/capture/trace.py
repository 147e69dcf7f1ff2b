"""Trace pass: ``nn.Module -> GraphModule`` with torch.fx symbolic tracing.

Equivalence: the GraphModule computes what the module's ``forward`` computes for inputs that take
the same Python control flow as the symbolic trace (the usual torch.fx contract).

Refuses: modules torch.fx cannot trace. The error names the innermost module being traced, the
Python line where tracing failed and the way out (``leaf_modules=`` keeps a module as one opaque
call).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asr_fx.errors import InvalidOptionError, TraceError

from ..layers.transposed_linear import is_transposed_linear
from .autograd_functions import functions_kept_opaque
from .concrete_values import (
    MISSING,
    ConcreteProxy,
    ConcreteValues,
    guard_message,
    metadata_only,
    refuse,
    sequence_length,
    state_kept,
    tensor_like,
)
from .default_flags import default_flags
from .factory_calls import recorded_factories
from .inplace_proxy import InplaceProxy
from .opaque_libraries import is_opaque_library_layer, mode_functions, opaque_function_modules
from .plain_layers import CallingRMSNorm, plain_layers
from .rms_norm_modules import install_rms_norm_twins, rms_norm_module_paths
from .trace_errors import trace_error
from .traced_indexing import dtype_info_traced, indexing_traced
from .training_flags import ModeDifference, align, bind_mode_flags, mode_dependent_module

LeafSpec = Iterable["str | type[nn.Module]"] | Callable[[nn.Module, str], bool] | None

#: the torch package's own directory, with a trailing separator: ``.../torchvision`` is not torch
#: how many modules a trace may keep as leaves because their forward branches on ``self.training``
_MAX_MODE_LEAVES = 64
#: GraphModule meta key: paths of modules kept as calls (they branch on ``self.training``) that are the
#: identity in eval mode, such as drop-path; placement walks through them like stochastic depth
EVAL_IDENTITY = "asr_fx.eval_identity"


class _NoKeywords(dict):
    """The empty ``**kwargs`` of a traced forward (a dict subclass: a pytree leaf, not an input tree)."""


class _NoPositionals(tuple):
    """The empty ``*args`` of a traced forward."""


class ASRTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` with user leaf modules and a readable failure message.

    ``leaf_modules`` holds qualified module names, module classes, or is a predicate
    ``(module, qualified_name) -> bool``. ``inline`` lists module classes that are traced through
    even though the default tracer would keep them as leaves.
    """

    def __init__(self, leaf_modules: LeafSpec = None, inline: tuple[type, ...] = (),
                 example_inputs: tuple[Any, ...] | None = None) -> None:
        super().__init__(autowrap_modules=(math, *opaque_function_modules()),  # type: ignore[arg-type] # einops: calls
                         autowrap_functions=(sequence_length,))  # a retraced length guard stays a call
        self._example_inputs = example_inputs
        self.concrete: ConcreteValues | None = None
        self._leaf_predicate: Callable[[nn.Module, str], bool] | None = None
        self._leaf_names: set[str] = set()
        self._leaf_types: tuple[type, ...] = ()
        if callable(leaf_modules) and not isinstance(leaf_modules, type):
            self._leaf_predicate = leaf_modules
        elif leaf_modules is not None:
            for item in leaf_modules:  # type: ignore[union-attr]
                if isinstance(item, str):
                    self._leaf_names.add(item)
                elif isinstance(item, type):
                    self._leaf_types += (item,)
                else:
                    raise InvalidOptionError(f"leaf_modules takes module paths (str) or module classes, got {item!r} "
                                             f"({type(item).__name__}); e.g. leaf_modules=['head', MyBlock]")
        self._inline = inline
        self.module_stack_names: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        if self._leaf_predicate is not None and self._leaf_predicate(m, module_qualified_name):
            return True
        if self._inline and isinstance(m, self._inline):
            return False
        if is_opaque_library_layer(m) or is_transposed_linear(m) or isinstance(m, CallingRMSNorm):
            return True  # a layer rule's module (or a capture twin, traced again): its output is a site
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """Parameters become ``get_attr`` proxies through a name map built once per root.

        torch.fx's default scans every parameter of the model on each access, which makes tracing
        quadratic in depth for models that read parameters in ``forward`` (as ASR's ``psi`` is).
        """
        if self.concrete is not None and self.concrete.running:
            return attr_val
        if isinstance(attr_val, nn.Parameter):
            names = self._parameter_names()
            name = names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _parameter_names(self) -> dict[int, str]:
        if getattr(self, "_names_root", None) is not self.root:
            self._names_root = self.root
            self._names: dict[int, str] = {}
            for name, p in self.root.named_parameters():
                self._names.setdefault(id(p), name)
        return self._names

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None) -> Any:
        """A forward wrapped by a ``(*args, **kwargs)`` decorator (transformers' ``can_return_tuple``, output
        capturing) gets placeholders from the function it wraps and is called with those (``self`` positionally,
        the others by name)."""
        inner = inspect.unwrap(root_fn)
        if inner is root_fn or not root_fn.__code__.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        _, args = super().create_args_for_root(inner, is_module, concrete_args)
        names = inner.__code__.co_varnames[:inner.__code__.co_argcount]

        def call_wrapper(*values: Any) -> Any:  # by name: a decorator may set some itself (`use_cache`)
            return root_fn(values[0], **dict(zip(names[1:], values[1:len(names)])))

        return call_wrapper, args

    def _proxy_placeholder(self, name: str, concrete_args: Any, sig: Any, fn_for_analysis: Any) -> Any:
        """``*args``/``**kwargs`` of the traced forward are empty (a tuple and a dict, not a Proxy that
        cannot be unpacked): the captured graph takes the named arguments only (``return_dict``-style
        decorators and ``**kwargs`` pass-throughs then trace)."""
        if name.startswith("**") and not (concrete_args and name[2:] in concrete_args):
            return _NoKeywords()
        if name.startswith("*") and not name.startswith("**") and not (concrete_args and name[1:] in concrete_args):
            return _NoPositionals()
        return super()._proxy_placeholder(name, concrete_args, sig, fn_for_analysis)

    def create_arg(self, a: Any) -> Any:
        """A dict subclass returned by forward (transformers' ``ModelOutput``) is rebuilt as that class, not
        flattened to a plain dict (the library indexes it: ``outputs[0]``, ``outputs.logits``)."""
        if isinstance(a, dict) and type(a) not in (dict, OrderedDict, _NoKeywords) \
                and not isinstance(a, fx.immutable_collections.immutable_dict) and all(isinstance(k, str) for k in a):
            return self.create_node("call_function", type(a), (), {k: super(ASRTracer, self).create_arg(v)
                                                                   for k, v in a.items()})
        return super().create_arg(a)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if self.concrete is not None:  # shape-aware: carries its value on example_inputs
            return ConcreteProxy(node, self)
        return InplaceProxy(node, self)  # records `a += b` / `a *= b` as in-place ops

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """torch.fx's trace, leaving ``root`` as it was (:func:`~asr_fx.passes.capture.concrete_values.state_kept`:
        buffers, module attributes a forward caches, the RNG state). With ``example_inputs`` every operation
        also runs on the example's values (:mod:`asr_fx.passes.capture.concrete_values`). A custom autograd Function's
        ``apply`` stays one call (:mod:`asr_fx.passes.capture.autograd_functions`: its backward is kept)."""
        if not isinstance(root, nn.Module):
            return super().trace(root, concrete_args)
        shape_aware = self._example_inputs is not None
        self._autowrap_function_ids |= {id(fn) for fn in mode_functions(root)}  # drop_connect(x, training=...)
        self.concrete = ConcreteValues(root, self._example_inputs) if self._example_inputs is not None else None
        try:  # shape-aware: torch.ones(batch, n) becomes a node, not an error
            with state_kept(root), functions_kept_opaque(), indexing_traced(), \
                    recorded_factories(self, random_only=not shape_aware), \
                    (dtype_info_traced(self) if shape_aware else contextlib.nullcontext()):
                graph = super().trace(root, concrete_args)
                constants = {n.target: getattr(root, n.target) for n in graph.nodes  # torch.fx's _tensor_constantN
                             if n.op == "get_attr" and n.target in vars(root)}
        finally:
            self.concrete = None
        for name, value in constants.items():  # state_kept removed them with the forward's own attributes
            setattr(root, name, value)
        return graph

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.concrete is not None:
            self.concrete.record(proxy.node, kind, target, args, kwargs)
            self.concrete.forget_with(proxy)
        return proxy

    def _known(self, obj: Any, what: str) -> Any:
        if self.concrete is None:
            raise refuse(what, "shapes" if what == "iteration" or metadata_only(obj) else "values")
        if self.concrete.from_data(obj):
            value = self.concrete.value(obj)
            if not (what == "iteration" and tensor_like(value) and not self.concrete.shape_from_data(obj)):
                raise refuse(what, "unknown" if value is MISSING else "values")
        return self.concrete.value(obj)

    def _guard(self, condition: Any, node_value: tuple[Any, Any]) -> None:
        node = node_value[0].node
        self.create_proxy("call_function", torch._assert, (condition, guard_message(node, node_value[1])), {})

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A data-independent condition takes its value on example_inputs, guarded in the graph."""
        known = self._known(obj, "a condition")
        condition = self.create_proxy("call_function", operator.eq, (obj, known), {})  # a proxy when retraced
        self._guard(condition, (obj, known))
        value = bool(known)
        return value

    def concrete_value(self, obj: Any, convert: Callable[[Any], Any]) -> Any:
        """``int(p)``, ``float(p)`` of a data-independent value, guarded in the graph."""
        value = convert(self._known(obj, f"{convert.__name__}()"))
        self._guard(self.create_proxy("call_function", operator.eq, (obj, value), {}), (obj, value))
        return value

    def concrete_length(self, obj: Any) -> int:
        value = self._known(obj, "iteration")
        n = len(value)
        size = self.create_proxy("call_function", sequence_length, (obj,), {})
        self._guard(self.create_proxy("call_function", operator.eq, (size, n), {}), (obj, n))
        return n

    def iter(self, obj: fx.Proxy) -> Any:
        """Iterating a sequence or tensor of data-independent length: its items, the length guarded."""
        return iter([obj[i] for i in range(self.concrete_length(obj))])  # type: ignore[index]

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self.concrete is not None and self.concrete.running:
            return forward(*args, **kwargs)  # computing a value on example_inputs, not tracing
        try:
            path = self.path_of_module(m)
        except NameError:  # a module made inside forward (`nn.ReLU()(x)`): without state, its forward is traced
            if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
                raise
            return forward(*args, **kwargs)
        self.module_stack_names.append(path)
        result = super().call_module(m, forward, args, kwargs)
        self.module_stack_names.pop()
        return result


def _combine_leaves(leaf_modules: LeafSpec, extra: set[str]) -> LeafSpec:
    if not extra:
        return leaf_modules
    if leaf_modules is None:
        return list(extra)
    if callable(leaf_modules) and not isinstance(leaf_modules, type):
        predicate = leaf_modules
        return lambda m, name: name in extra or predicate(m, name)
    return [*leaf_modules, *extra]  # type: ignore[misc]


def _trace_once(model: nn.Module, leaf_modules: LeafSpec, inline: tuple[type, ...],
                concrete_args: dict[str, Any] | None,
                example_inputs: tuple[Any, ...] | None = None) -> fx.GraphModule:
    tracer = ASRTracer(leaf_modules, inline, example_inputs)
    flags = default_flags(model, example_inputs) if concrete_args is None else {}
    try:
        graph = tracer.trace(model, concrete_args=concrete_args if concrete_args is not None else flags or None)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise trace_error(model, tracer, exc) from exc
    for node in graph.nodes:  # torch.fx names a specialized argument `flag_1`: callers pass it as `flag=`
        if node.op == "placeholder" and str(node.target).endswith("_1") and str(node.target)[:-2] in flags:
            node.target = node.name = str(node.target)[:-2]
        if node.op == "placeholder" and node.target in flags:
            node.args = (flags[node.target],)  # its default: the value it was specialized to
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)  # read for its metadata only (`self.wo.weight.dtype`): not a use of the weight
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    plain_layers(gm, model)
    return gm


def _trace_in_mode(model: nn.Module, training: bool, *args: Any) -> fx.GraphModule:
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        return _trace_once(model, *args)
    finally:
        for m, mode in modes.items():
            m.training = mode


def trace(
    model: nn.Module,
    leaf_modules: LeafSpec = None,
    inline: tuple[type, ...] = (),
    concrete_args: dict[str, Any] | None = None,
    bind_training: bool = True,
    example_inputs: tuple[Any, ...] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a ``GraphModule`` whose submodules keep their names.

    Composite layers (a norm with its activation inside, ...) are traced through, their functional
    norm call becoming a plain layer at the same path (:mod:`asr_fx.passes.capture.plain_layers`); RMS norm
    modules written out in Python stay one call (:mod:`asr_fx.passes.capture.rms_norm_modules`).

    ``bind_training`` (default): the model is traced in train and in eval mode and the graphs compared
    (:mod:`asr_fx.passes.capture.training_flags`): boolean arguments that follow the mode read the
    GraphModule's ``training`` flag, and a module whose forward branches on ``self.training`` stays one
    call (its forward reads its own flag). The result follows ``train()``/``eval()`` like the model.
    ``False``: one trace in the model's current mode, flags kept as tracing saw them (for
    inference-only graphs).

    ``example_inputs``: shape-aware tracing (:mod:`asr_fx.passes.capture.concrete_values`): Python that needs a
    value of a size, dtype or length (shape checks, ``(*shape, -1)``, ``int(math.sqrt(n))``) gets its value on
    these inputs, guarded in the graph by a ``torch._assert``.

    Raises :class:`asr_fx.errors.TraceError` naming the module and the Python line where tracing
    failed (the library's own line, not torch's).
    """
    gm: fx.GraphModule
    rms_norms = rms_norm_module_paths(model)  # RMS norm modules written out in Python: one call each
    leaf_modules = _combine_leaves(leaf_modules, rms_norms)
    if not bind_training:
        gm = _trace_once(model, leaf_modules, inline, concrete_args, example_inputs)
    else:
        mode_leaves: set[str] = set()
        while True:
            spec = _combine_leaves(leaf_modules, mode_leaves)
            gm_eval = _trace_in_mode(model, False, spec, inline, concrete_args, example_inputs)
            try:
                gm = _trace_in_mode(model, True, spec, inline, concrete_args, example_inputs)
            except TraceError as exc:  # traces in eval only: the failing module's train branch stays its own call
                where = exc.module or ""
                if not where or where in mode_leaves or len(mode_leaves) >= _MAX_MODE_LEAVES:
                    raise
                mode_leaves.add(where)
                continue
            try:
                flags = align(gm, gm_eval)
            except ModeDifference as diff:
                if len(mode_leaves) >= _MAX_MODE_LEAVES:
                    raise TraceError(f"{type(model).__name__}: more than {_MAX_MODE_LEAVES} modules branch on "
                                     f"self.training ({sorted(mode_leaves)[:5]}...); trace it with "
                                     "bind_training=False in the mode you will run it in") from None
                mode_leaves.add(mode_dependent_module(diff, mode_leaves, type(model).__name__))
                continue
            bind_mode_flags(gm, flags)
            break
        gm.meta["asr_fx.mode_leaves"] = sorted(mode_leaves)
        gm.meta[EVAL_IDENTITY] = [p for p in sorted(mode_leaves) if _is_eval_identity(model.get_submodule(p))]
    install_rms_norm_twins(gm, rms_norms)
    _copy_modes(gm, model)
    for attr in ("_asr_fx_factory",):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm


def _is_eval_identity(module: nn.Module) -> bool:
    """``module`` returns its (first) input unchanged in eval mode (drop-path, dropout written by hand)."""
    try:
        gm = _trace_in_mode(module, False, None, (), None)
    except TraceError:
        return False
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return bool(placeholders) and output.args[0] is placeholders[0]


def _copy_modes(gm: fx.GraphModule, model: nn.Module) -> None:
    """Each submodule of ``gm`` in the mode of the model's module at the same path."""
    gm.training = model.training
    for name, module in gm.named_modules():
        if not name:
            continue
        try:
            module.training = model.get_submodule(name).training
        except AttributeError:
            module.training = model.training
