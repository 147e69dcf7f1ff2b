"""Pass 1, trace: ``nn.Module -> GraphModule`` with torch.fx symbolic tracing.

Equivalence: the GraphModule computes what the module's ``forward`` computes for inputs that take
the same Python control flow as the symbolic trace (the usual torch.fx contract).

Refuses: modules torch.fx cannot trace. The error names the innermost module being traced, the
Python line where tracing failed and the way out (``leaf_modules=`` keeps a module as one opaque
call).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asr_fx.errors import TraceError

from .inplace_proxy import InplaceProxy

LeafSpec = Iterable["str | type[nn.Module]"] | Callable[[nn.Module, str], bool] | None

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_DIR = os.path.dirname(__file__)


class ASRTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` with user leaf modules and a readable failure message.

    ``leaf_modules`` holds qualified module names, module classes, or is a predicate
    ``(module, qualified_name) -> bool``. ``inline`` lists module classes that are traced through
    even though the default tracer would keep them as leaves.
    """

    def __init__(self, leaf_modules: LeafSpec = None, inline: tuple[type, ...] = ()) -> None:
        super().__init__()
        self._leaf_predicate: Callable[[nn.Module, str], bool] | None = None
        self._leaf_names: set[str] = set()
        self._leaf_types: tuple[type, ...] = ()
        if callable(leaf_modules) and not isinstance(leaf_modules, type):
            self._leaf_predicate = leaf_modules
        elif leaf_modules is not None:
            for item in leaf_modules:
                if isinstance(item, str):
                    self._leaf_names.add(item)
                elif isinstance(item, type):
                    self._leaf_types += (item,)
                else:
                    raise TypeError(f"leaf_modules takes module names or classes, got {item!r}")
        self._inline = inline
        self.module_stack_names: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        if self._leaf_predicate is not None and self._leaf_predicate(m, module_qualified_name):
            return True
        if self._inline and isinstance(m, self._inline):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """Parameters become ``get_attr`` proxies through a name map built once per root.

        torch.fx's default scans every parameter of the model on each access, which makes tracing
        quadratic in depth for models that read parameters in ``forward`` (as ASR's ``psi`` is).
        """
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

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InplaceProxy(node, self)  # records `a += b` / `a *= b` as in-place ops

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self.module_stack_names.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.module_stack_names.pop()
        return result


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch and asr-fx: the user's line."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith((_TORCH_DIR, _THIS_DIR)):
            return frame
    return frames[-1] if frames else None


def trace(
    model: nn.Module,
    leaf_modules: LeafSpec = None,
    inline: tuple[type, ...] = (),
    concrete_args: dict[str, Any] | None = None,
    bind_training: bool = True,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a ``GraphModule`` whose submodules keep their names.

    ``bind_training``: dropout-like calls follow the GraphModule's ``train()``/``eval()`` (see
    :func:`bind_training_flags`); ``False`` keeps the flags tracing saw, for inference-only graphs.

    Raises :class:`asr_fx.errors.TraceError` naming the module and the Python line where tracing
    failed.
    """
    tracer = ASRTracer(leaf_modules, inline)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        where = tracer.module_stack_names[-1] if tracer.module_stack_names else ""
        module = model.get_submodule(where) if where else model
        frame = _user_frame(exc)
        line = f" at {frame.filename}:{frame.lineno} (`{(frame.line or '').strip()}`)" if frame else ""
        label = f"`{where}` ({type(module).__name__})" if where else f"the model ({type(model).__name__})"
        hint = (
            f"pass leaf_modules=[{where!r}] (or its class {type(module).__name__}) to keep it as one opaque call"
            if where
            else "make forward traceable (no data-dependent Python control flow), or trace a submodule"
        )
        raise TraceError(
            f"torch.fx could not trace {label}{line}: {type(exc).__name__}: {exc}. Way out: {hint}."
        ) from exc
    if bind_training:
        bind_training_flags(graph, model.training)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    for attr in ("_asr_fx_factory",):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm


def _training_arguments() -> dict[Callable[..., Any], tuple[int, str]]:
    """Functions that take the module's ``training`` flag: (positional index, keyword) of the flag."""
    F = torch.nn.functional
    table: dict[Callable[..., Any], tuple[int, str]] = {
        F.dropout: (2, "training"),
        F.dropout1d: (2, "training"),
        F.dropout2d: (2, "training"),
        F.dropout3d: (2, "training"),
        F.alpha_dropout: (2, "training"),
        F.feature_alpha_dropout: (2, "training"),
    }
    try:  # torchvision's stochastic depth is wrapped for torch.fx: a call_function node
        from torchvision.ops.stochastic_depth import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is optional
        pass
    else:
        table[stochastic_depth] = (3, "training")
    return table


def bind_training_flags(graph: fx.Graph, traced_training: bool) -> fx.Graph:
    """Re-attach ``self.training`` to dropout-like calls whose flag tracing froze into a constant.

    ``F.dropout(x, p, self.training)`` and torchvision's ``stochastic_depth(x, p, mode,
    self.training)`` trace to calls with a literal ``True``/``False``, so a model traced in train
    mode would keep dropping in eval mode. Each such literal equal to the model's mode at trace time
    becomes a read of the GraphModule's own ``training`` flag, which ``train()``/``eval()`` set.
    Equivalence: exact in the mode the model was traced in; the other mode now behaves as the
    original module does. Calls that pass a fixed flag different from the model's mode are kept.
    """
    table = _training_arguments()
    flag: fx.Node | None = None
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in table:
            continue
        index, keyword = table[node.target]
        if keyword in node.kwargs:
            value, where = node.kwargs[keyword], keyword
        elif len(node.args) > index:
            value, where = node.args[index], index
        else:
            continue
        if not isinstance(value, bool) or value != traced_training:
            continue
        if flag is None:
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first):
                flag = graph.get_attr("training")
        if isinstance(where, str):
            node.kwargs = {**node.kwargs, where: flag}
        else:
            node.args = node.args[:where] + (flag,) + node.args[where + 1:]
    return graph
