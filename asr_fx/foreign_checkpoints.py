"""Checkpoints in other formats than asr-fx's own: what ``asr-fx fuse``/``verify`` accept besides
:func:`asr_fx.save` files.

A bare state_dict, a training checkpoint holding one (``{"state_dict": ...}``, ``{"model": ...}``;
DDP's ``module.``, Lightning's ``model.`` and torch.compile's ``_orig_mod.`` prefixes are stripped),
given with the factory that builds the model; and, only when trusted, a pickled ``nn.Module``.
:func:`load_checkpoint` also reads asr-fx checkpoints (through :mod:`asr_fx.checkpoint`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from asr_fx.api import get_config, instrument
from asr_fx.attention import widths_from_state_dict
from asr_fx.checkpoint import FORMAT, model_from_checkpoint, read_checkpoint, resolve_attention
from asr_fx.dcp import is_dcp_dir
from asr_fx.equivalence import random_probe
from asr_fx.errors import CheckpointError, InputShapeError
from asr_fx.factory import build
from asr_fx.state_dicts import (
    asr_layout,
    check_finite_asr,
    check_keys,
    find_state_dict,
    normalize_keys,
    with_version_metadata,
)


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` found: the model to fuse and what to compare it with."""

    model: nn.Module
    """the model as trained (instrumented, or with its own ASR blocks), eval mode"""
    vanilla: nn.Module | None
    """the same network without ASR blocks (its trained weights), or None when unknown"""
    kind: str
    """the checkpoint's format, e.g. ``"asr-fx"`` or ``"training checkpoint ['model']"``"""
    input_shape: list[int] | None = None
    notes: list[str] = field(default_factory=list)


def _vanilla_with_weights(factory: str, kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    vanilla = build(factory, **kwargs)
    own = vanilla.state_dict()
    fitting = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    vanilla.load_state_dict(with_version_metadata(fitting, vanilla), strict=False)
    return vanilla.eval()


def _shape_hint(*sources: Any) -> list[int] | None:
    for source in sources:
        shape = source.get("input_shape") if isinstance(source, dict) else getattr(source, "input_shape", None)
        if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) for d in shape):
            return list(shape)
    return None


def _runs_on(model: nn.Module, shape: list[int]) -> torch.Tensor:
    """A random input of ``shape`` after checking that ``model`` runs on it (one clear error if not)."""
    x = random_probe(shape)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:  # noqa: BLE001
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise InputShapeError(f"the model does not run on an input of shape {list(shape)}: {type(exc).__name__}: "
                              f"{first}; pass the shape it expects (input_shape=)", shape=list(shape)) from exc
    return x


def load_checkpoint(
    path: str | os.PathLike,
    *,
    factory: str | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    asr_options: dict[str, Any] | None = None,
    trust: bool = False,
    input_shape: list[int] | None = None,
    leaf_modules: Any = None,
) -> LoadedCheckpoint:
    """Load any checkpoint the CLI accepts and return the model to fuse.

    Accepts an :func:`save` checkpoint; a bare state_dict or a training checkpoint holding one
    (``{"state_dict": ...}``, ``{"model": ...}``; ``module.``, ``model.`` and ``_orig_mod.``
    prefixes are stripped) together with ``factory`` (``"package.module:function"``) and
    ``factory_kwargs``; and, only with ``trust=True``, a pickled ``nn.Module``.

    A state_dict with ``asr.<site>...`` keys was instrumented: the factory's model is instrumented
    again with ``asr_options`` (keyword arguments of :func:`asr_fx.instrument`; by default the sites
    and ``delta`` are read from the keys). One without them is loaded into the factory's model as it is
    (a model whose factory builds its own ASR blocks).
    """
    raw = read_checkpoint(path, trust=trust)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        options = asr_options or {}
        model = model_from_checkpoint(raw, path, leaf_modules, options.get("attention"),
                                      options.get("attention_kwargs"))
        vanilla: nn.Module | None = _vanilla_with_weights(raw["factory"], raw.get("factory_kwargs", {}),
                                                          raw["state_dict"])
        kind = "asr-fx (torch.distributed.checkpoint folder)" if is_dcp_dir(path) else "asr-fx"
        return LoadedCheckpoint(model, vanilla, kind, input_shape or raw.get("input_shape"))
    weights, kind = find_state_dict(raw, repr(str(path)))
    if is_dcp_dir(path):
        kind = f"torch.distributed.checkpoint folder, {kind}"
    kwargs = dict(factory_kwargs or {})
    if isinstance(weights, nn.Module):
        model = weights.eval()
        check_finite_asr(model.state_dict())
        recorded = (get_config(model) or {}).get("factory") or {}
        vanilla = None
        if factory or recorded.get("factory"):
            vanilla = _vanilla_with_weights(factory or recorded["factory"],
                                            kwargs if factory else recorded.get("kwargs") or {},
                                            model.state_dict())
        shape = input_shape or _shape_hint(get_config(model) or {}, raw if isinstance(raw, dict) else None, model)
        return LoadedCheckpoint(model, vanilla, kind, shape)
    if factory is None:
        raise CheckpointError(f"{str(path)!r} is a {kind}: it holds weights but not how to build the model; pass "
                              "factory='package.module:function' (and factory_kwargs= for its arguments)",
                              path=str(path), reason="no-factory")
    base = build(factory, **kwargs).eval()
    state_dict, notes = normalize_keys(weights, base.state_dict().keys())
    shape = input_shape or _shape_hint(raw, base)
    sites, delta = asr_layout(state_dict)
    hint = f"Check the factory {factory!r} and its factory_kwargs"
    attention, instrumented = None, True
    if sites and get_config(base) is None and not any(k.startswith("asr.") for k in base.state_dict()):
        options = dict(asr_options or {})
        if options.get("sites") is None and options.get("rule") is None:
            options["sites"] = sites
        options.setdefault("delta", delta)
        options = {k: v for k, v in options.items() if v is not None}
        options["attention_kwargs"] = {**widths_from_state_dict(options.get("attention", "se"), state_dict),
                                       **(options.get("attention_kwargs") or {})}  # the widths it was trained with
        if "attention" in options:
            options["attention"] = resolve_attention(options["attention"])
        example = (_runs_on(base, shape),) if shape else None
        model = instrument(copy.deepcopy(base), example_inputs=example, leaf_modules=leaf_modules, **options)
        hint += ", and the ASR options it was trained with (attention, attention_kwargs, delta, sites)"
        attention = options.get("attention", "se")
        notes.append(f"instrumented again at {len(sites)} site(s) from the checkpoint's asr.* keys")
    else:
        model, instrumented = base, False
        if not sites:
            notes.append("no asr.* keys: the model is fused as the factory builds it")
    check_finite_asr(state_dict)
    check_keys(model, state_dict, hint=hint, attention=attention)
    model.load_state_dict(with_version_metadata(state_dict, model))
    vanilla = _vanilla_with_weights(factory, kwargs, state_dict) if instrumented else None
    return LoadedCheckpoint(model.eval(), vanilla, kind, shape, notes)
