"""Partial capture: where a model's whole forward cannot be traced, instrument its largest capturable parts.

Detectors (post-processing with data-dependent control flow), YOLO's head, models whose forward checks
input shapes or takes ``return_dict``-style flags: ``instrument`` falls back to this module when the
root does not trace. One run of the model on ``example_inputs`` records the arguments each submodule is
called with; then, walking the module tree from the top, every child that is called with tensors only
(keyword arguments at their defaults) and that ``instrument`` accepts is instrumented as a whole and
replaces the child in a copy of the model, **in place**: the model keeps its class and its own Python
forward, its state_dict keys stay as they were (plus ``<part>.asr.*``). A child that does not trace
(or whose check fails) is descended into; a child without sites is left alone. A child called with
tensors by keyword (a transformer block's ``mask=``, token ids, a boolean mask) takes them as inputs too, the
arguments between them at their default ``None``; an integer or boolean input's dtype and value range are
recorded (``part_input_kinds``), so that a probe for the part (:func:`part_probe`) has that dtype and range.

``fuse`` on such a model fuses every part in place (:func:`fuse_parts`).

Equivalence: each part is checked by ``instrument`` as usual (v = 1 against the original child, in
eval and train mode), and the fused parts against the instrumented ones.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asr_fx.config import ASRConfig, asr_config, set_config
from asr_fx.equivalence import check_fused, derive_probe, saved_state
from asr_fx.errors import ASRError, InputShapeError, InvalidOptionError, NoSitesError, TraceError
from asr_fx.fusion import FUSION_KEY, FusionReport, fusion_report
from asr_fx.passes.capture.way_out import way_out
from asr_fx.site_locators import Locators, locate


def record_calls(model: nn.Module, example_inputs: tuple[Any, ...]) -> dict[str, tuple[tuple, dict]]:
    """The ``(args, kwargs)`` of each submodule's first call when ``model`` runs on ``example_inputs`` (eval)."""
    calls: dict[str, tuple[tuple, dict]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(name, (args, kwargs))
        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in model.named_modules() if n]
    try:
        with saved_state(model), torch.no_grad():
            model.eval()
            # on copies: the caller's inputs stay as they are
            model(*(t.clone() if isinstance(t, torch.Tensor) else t for t in example_inputs))
    except Exception as exc:  # noqa: BLE001 - re-raised as one clear line
        raise InputShapeError(f"{type(model).__name__} does not run on example_inputs: {type(exc).__name__}: {exc}. "
                              "Pass inputs its forward accepts", shape=next((list(t.shape) for t in example_inputs
                                                   if isinstance(t, torch.Tensor)), None)) from exc
    finally:
        for h in handles:
            h.remove()
    return calls


def _flags_only(values: Any) -> bool:
    """No ``**kwargs`` given (``values`` is the parameter's empty default), or plain flags only."""
    if values is inspect.Parameter.empty:
        return True
    plain = (bool, int, float, str, type(None))
    return isinstance(values, dict) and all(isinstance(v, plain) for v in values.values())


def _tensor_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, ...] | None:
    """The call's inputs as positional arguments: its tensors, positionally or by keyword
    (``block(x, mask=mask)``), with the arguments between them at a default of ``None``; every other argument
    at its default, except plain flags passed through ``**kwargs`` (transformers 5 hands every layer
    ``output_hidden_states=...`` that way): those are left out of the capture (:func:`_passes_flags`).
    ``None`` when the call does not have that form."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    given = [bound.arguments.get(p.name, p.default) for p in params]
    tensor_at = [i for i, v in enumerate(given) if isinstance(v, torch.Tensor)]
    if not tensor_at or tensor_at[0] != 0:
        return None
    inputs: list[Any] = []
    for i, (param, value) in enumerate(zip(params, given)):
        if i <= tensor_at[-1]:
            if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                return None
            if isinstance(value, torch.Tensor):
                inputs.append(value)
            elif value is None and param.default is None:
                inputs.append(None)
            else:
                return None
        elif param.kind is param.VAR_KEYWORD:
            if not _flags_only(value):
                return None
        elif param.kind is param.VAR_POSITIONAL:
            if value not in ((), param.default):
                return None
        elif param.default is inspect.Parameter.empty or not _same(value, param.default):
            return None
    return tuple(inputs)


def _passes_flags(module: nn.Module, kwargs: dict) -> list[str]:
    """The keywords of the call that no named parameter of ``module.forward`` takes (its ``**kwargs`` does):
    the part is captured without them, which only its module form (the user's own forward) can keep."""
    try:
        named = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return []
    return sorted(k for k in kwargs if k not in named)


def input_kind(value: Any) -> dict[str, Any] | None:
    """A part input's kind for :func:`part_probe`: None for a floating-point tensor (a probe draws normal values)
    or no tensor; for an integer or boolean tensor its dtype and the range of its values."""
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex():
        return None
    values = value.detach().to("cpu", torch.int64)
    low, high = (int(values.min()), int(values.max())) if values.numel() else (0, 0)
    return {"dtype": str(value.dtype).removeprefix("torch."), "low": low, "high": high}


def part_probe(config: ASRConfig, path: str, like: torch.Tensor | None) -> tuple[Any, ...] | None:
    """A seeded probe input for the part at ``path`` of a partially captured model: per recorded input shape, normal
    values (on ``like``'s device and dtype), or for an integer or boolean input values of its recorded dtype and range
    (``part_input_kinds``); None where the config records no shapes for it."""
    shapes = (config.part_input_shapes or {}).get(path)
    if not shapes:
        return None
    kinds = (config.part_input_kinds or {}).get(path) or [None] * len(shapes)
    gen = torch.Generator().manual_seed(0)
    probe: list[Any] = []
    for shape, kind in zip(shapes, kinds):
        if shape is None:
            probe.append(None)
        elif kind is None:
            x = torch.randn(shape, generator=gen)
            probe.append(x.to(like.device, like.dtype) if like is not None else x)
        else:
            x = torch.randint(kind["low"], kind["high"] + 1, shape, generator=gen).to(getattr(torch, kind["dtype"]))
            probe.append(x.to(like.device) if like is not None else x)
    return tuple(probe)


def _same(value: Any, default: Any) -> bool:
    try:
        return value is default or bool(value == default)
    except Exception:  # noqa: BLE001 - values without a plain ==
        return False


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


_MODULE_STATE = set(nn.Module().__dict__) | {"meta", "asr_fx_config"}
#: GraphModule meta key whose attributes survive ``copy.deepcopy`` (torch.fx's own convention)
_PRESERVED = "_user_preserved_attributes"


def _captured_class(library_class: type) -> type:
    """A GraphModule subclass with the properties of ``library_class`` (smp reads ``encoder.output_stride``)."""
    props: dict[str, Any] = {}
    for klass in reversed(library_class.__mro__):
        if klass in (nn.Module, object):
            continue
        props.update({k: v for k, v in vars(klass).items()
                      if isinstance(v, property) and not hasattr(fx.GraphModule, k)})
    return type(f"Captured{library_class.__name__}", (fx.GraphModule,), props)


def _keep_attributes(part: nn.Module, child: nn.Module) -> None:
    """The library's own plain attributes and properties of ``child`` (ultralytics reads ``m.f``, ``m.i``;
    smp ``encoder.output_stride``) on the GraphModule that replaces it, kept across ``copy.deepcopy``."""
    library_class = getattr(child, "_asr_fx_library_class", type(child))
    kept = {k: v for k, v in child.__dict__.items()
            if k not in _MODULE_STATE and k not in part.__dict__ and not isinstance(v, (nn.Module, torch.Tensor))}
    kept["_asr_fx_library_class"] = library_class
    for key, value in kept.items():
        setattr(part, key, value)
    if isinstance(part, fx.GraphModule):
        part.meta.setdefault(_PRESERVED, {}).update(kept)
        part.__class__ = type("GraphModuleImpl", (_captured_class(library_class),), {})
        part.recompile()


#: :func:`_part_sites`'s answer where the child cannot take its sites whole: look inside it
_DESCEND = "descend"


def _part_sites(sites: Any, path: str, child: nn.Module, inputs: tuple[Any, ...] | None, leaf_modules: Any) -> Any:
    """``instrument``'s ``sites=`` for the child at ``path``: None (placement), a predicate, or names."""
    if sites is None or callable(sites):
        return sites
    if isinstance(sites, Locators):
        names = sites.names(path, child, inputs, leaf_modules) if inputs is not None else None
        return _DESCEND if names is None else names
    prefix = f"{path}/"
    return [s[len(prefix):] for s in sites if isinstance(s, str) and s.startswith(prefix)]


def instrument_parts(model: nn.Module, error: TraceError, instrument: Callable[..., nn.Module],
                     options: dict[str, Any]) -> nn.Module:  # noqa: C901 - one walk of the module tree
    """Instrument the largest capturable parts of ``model`` in place (in a copy); see the module docstring.

    ``options`` are :func:`asr_fx.instrument`'s keyword arguments; ``instrument`` is
    :func:`asr_fx.instrument_model.instrument_one`: each part is instrumented in place in the copy (in
    ``model`` itself with ``inplace``), in the module form where it fits, else replaced by its graph form.
    Raises ``error`` (the root's trace error) when no example inputs are given, or when no part takes a site
    (with that added).
    """
    example_inputs = options.get("example_inputs")
    if example_inputs is None:
        tried = way_out(model, error, options.get("leaf_modules"))
        raise TraceError(f"{error}{_line(tried)}\nOr pass example_inputs=(...) and asr-fx instruments the parts "
                         "of the model it can capture, leaving the rest as the model's own Python.",
                         module=error.module, module_class=error.module_class) from error
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    calls = record_calls(model, example_inputs)
    work = model if options.get("inplace") else copy.deepcopy(model)
    parts: dict[str, ASRConfig] = {}
    refused: list[str] = []
    shapes: dict[str, list[list[int] | None]] = {}
    kinds: dict[str, list[dict[str, Any] | None]] = {}

    def visit(path: str, module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            child_path = f"{path}.{name}" if path else name
            if child_path not in calls:  # not called itself (a container whose children are): look inside
                visit(child_path, child)
                continue
            inputs = _tensor_inputs(child, *calls[child_path])
            sites = _part_sites(options.get("sites"), child_path, child, inputs, options.get("leaf_modules"))
            if sites == []:
                continue
            if inputs is not None and sites != _DESCEND:
                target = work.get_submodule(child_path)  # inplace: the module form attaches to it
                try:  # not inplace: a copy, so that a part whose sites have no place in it can be split further
                    part = instrument(target, {**options, "example_inputs": inputs, "sites": sites,
                                               "inplace": bool(options.get("inplace")), "in_part": True},
                                      graph_ok=True)
                except NoSitesError as exc:  # modules kept whole for their train-only code may hold sites: look inside
                    if not exc.opaque_modules:
                        continue
                except ASRError as exc:
                    refused.append(f"{child_path}: {shorten(str(exc).splitlines()[0], 300)}")
                else:
                    flags = _passes_flags(child, calls[child_path][1])
                    if flags and isinstance(part, fx.GraphModule):  # the graph would fix them at their absence
                        refused.append(f"{child_path}: its forward takes {', '.join(flags)} through **kwargs, which "
                                       "only the module form keeps, and its sites have no place in that form")
                        visit(child_path, child)
                        continue
                    if part is not target:  # a copy, or the graph form: replaces the child
                        if isinstance(part, fx.GraphModule):
                            _keep_attributes(part, child)
                        _set_submodule(work, child_path, part)
                    parts[child_path] = part_config(part)
                    shapes[child_path] = [list(t.shape) if isinstance(t, torch.Tensor) else None for t in inputs]
                    kinds[child_path] = [input_kind(t) for t in inputs]
                    continue
            visit(child_path, child)

    visit("", model)
    if not parts:  # nothing captured alone either: the root's own error says what to do
        tried = way_out(model, error, options.get("leaf_modules"), example_inputs)
        detail = "".join(f"\n  - {r}" for r in refused[:5]) + (f"\n  ... and {len(refused) - 5} more"
                                                               if len(refused) > 5 else "")
        raise TraceError(f"{error}{_line(tried)}\nNo part of {type(model).__name__} takes an ASR site when "
                         f"instrumented alone either" + (f"; refused parts:{detail}" if refused else "."),
                         module=error.module, module_class=error.module_class) from error
    sites = [{**s, "node": f"{path}/{s['node']}", "part": path} for path, cfg in parts.items()
             for s in cfg.sites or []]
    first = next(iter(parts.values()))
    shape = list(example_inputs[0].shape) if isinstance(example_inputs[0], torch.Tensor) else None
    set_config(work, dataclasses.replace(first, sites=sites, parts=sorted(parts), refused_parts=refused,
                                         part_input_shapes=shapes, part_input_kinds=kinds, input_shape=shape,
                                         form="parts", graph_reason=None,
                                         factory=getattr(model, "_asr_fx_factory", None)))
    work.train(model.training)
    return work


def names_parts(sites: Any) -> bool:
    """``sites`` names sites of parts (``"<part path>/<node>"``, as a partially captured model's config does)."""
    return isinstance(sites, (list, tuple)) and bool(sites) and all(isinstance(s, str) and "/" in s for s in sites)


def in_parts(model: nn.Module, reason: str, gm: fx.GraphModule, chosen: list[Any],
             instrument: Callable[..., nn.Module], options: dict[str, Any]) -> nn.Module | None:
    """``model`` (a copy) with its sites in captured parts, where some site has no place in its modules
    (``reason``): the model keeps its class and its own forward, the parts that hold such sites become
    GraphModules inside it. ``None`` when that does not give the same sites as the whole model's
    placement (``chosen`` in ``gm``, the whole model's trace: as many, after the same modules), or no probe
    input is known. Each part gets the sites of ``chosen`` inside it (:mod:`asr_fx.site_locators`)."""
    inputs = options.get("example_inputs") or derive_probe(model)
    locators = Locators(locate(gm, chosen))
    if inputs is None or options.get("inplace") or locators.outside_children():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the parts' own graph-form warnings: one warning below says it
            result = instrument_parts(model, TraceError(reason), instrument,
                                      {**options, "example_inputs": inputs, "sites": locators})
    except ASRError:
        return None
    got = getattr(asr_config(result), "sites", None) or []
    modules = sorted(s.module for s in chosen if s.module)
    in_parts = sorted(f"{s['part']}.{s['module']}" for s in got if s.get("module"))
    if len(got) != len(chosen) or modules != in_parts:
        return None
    parts = getattr(asr_config(result), "parts", None)
    warnings.warn(f"instrument keeps {type(model).__name__} but captures {parts} as GraphModules inside it: {reason}. "
                  "Those parts take their example inputs' non-tensor arguments as fixed", stacklevel=4)
    return result


def part_config(model: nn.Module) -> ASRConfig:
    """The config of an instrumented model (a part, or a model instrumented part by part)."""
    config = asr_config(model)
    if config is None:
        raise InvalidOptionError(f"{type(model).__name__} records no ASR config: it is not an instrumented model")
    return config


def part_paths(model: nn.Module) -> list[str]:
    """The paths of the instrumented parts of a model instrumented part by part (empty: none)."""
    config = asr_config(model)
    return list(config.parts or []) if config is not None else []


def shorten(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to at most ``limit`` characters, with an ellipsis when cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:.()`'\"")
    return cut + "…"


def _line(sentence: str) -> str:
    return f"\n{sentence}" if sentence else ""


def is_partial(model: nn.Module) -> bool:
    """``model`` came from :func:`instrument_parts` (its instrumented parts are GraphModules inside it)."""
    config = asr_config(model)
    return not isinstance(model, fx.GraphModule) and config is not None and bool(config.parts)


def fuse_parts(model: nn.Module, fuse: Callable[..., nn.Module], **options: Any) -> nn.Module:
    """A copy of a partially captured ``model`` with every instrumented part fused in place (eval mode).

    ``options`` are :func:`asr_fx.fuse`'s keyword arguments; the fusion reports of the parts are joined
    on the result (:func:`asr_fx.fusion.fusion_report`).
    """
    example_inputs = options.get("example_inputs")
    work = copy.deepcopy(model).eval()
    reports = []
    config = part_config(model)
    check = options.get("check", True)
    # with example_inputs the whole model is checked below, not each part (a detector's backbone at its
    # transform's 800 px would run again per part); without them each part is checked as it is fused
    probes: dict[str, tuple[Any, ...] | None] = {}
    for path in config.parts or []:
        part = work.get_submodule(path)
        probes[path] = part_probe(config, path, next(iter(part.parameters())))
        fused = fuse(part, **{**options, "example_inputs": probes[path], "check": check and example_inputs is None})
        _keep_attributes(fused, part)
        _set_submodule(work, path, fused)
        reports.append(fusion_report(fused))
    records = [r for report in reports if report is not None for r in report.records]
    blocks = tuple(b for report in reports if report is not None for b in report.blocks)
    work.__dict__["meta"] = {FUSION_KEY: FusionReport(records, blocks) if any(r is not None for r in reports) else None}
    # the whole model on example_inputs, else on the recorded input shape (the parts are checked already); where
    # that compares nothing (empty outputs: a detector that found nothing), each part on its own probe
    if check and not check_fused(model, work, example_inputs, warn=False) and example_inputs is not None:
        for path in config.parts or []:
            check_fused(model.get_submodule(path), work.get_submodule(path), probes[path])
    return work.eval()
