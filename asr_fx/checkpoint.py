"""Checkpoints of instrumented models: plain types and tensors, loadable with ``weights_only=True``.

Format (``format == "asr-fx"``, ``version == 1``)::

    {"format": "asr-fx", "version": 1,
     "factory": "package.module:function", "factory_kwargs": {...},
     "asr": {... the config instrument() recorded, sites included ...},
     "input_shape": [N, C, H, W] or None,
     "state_dict": {...}}
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asr_fx.errors import CheckpointError

FORMAT = "asr-fx"
VERSION = 1


def import_factory(spec: str) -> Any:
    """``"package.module:attr"`` -> the object (``attr`` may be dotted)."""
    if ":" not in spec:
        raise CheckpointError(f"factory {spec!r} should look like 'package.module:function'")
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(f"cannot import {module_name!r} for factory {spec!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CheckpointError(f"module {module_name!r} has no {attr!r} (factory {spec!r})") from None
    return obj


def build(factory: str, **kwargs: Any) -> nn.Module:
    """Build a model from ``"package.module:function"`` and remember how, so :func:`save` can record it."""
    model = import_factory(factory)(**kwargs)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"factory {factory!r} returned {type(model).__name__}, not an nn.Module")
    model._asr_fx_factory = {"factory": factory, "kwargs": kwargs}
    return model


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    factory: str | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    input_shape: list[int] | tuple[int, ...] | None = None,
) -> None:
    """Save an instrumented model as an asr-fx checkpoint.

    ``factory`` (``"package.module:function"``) rebuilds the vanilla model; it defaults to the one
    recorded by :func:`build`. ``input_shape`` is what the CLI exports with.
    """
    from asr_fx.api import get_config

    config = get_config(model)
    if config is None:
        raise CheckpointError("this model was not made by asr_fx.instrument: save its state_dict with torch.save instead")
    recorded = config.get("factory") or {}
    factory = factory or recorded.get("factory")
    if factory is None:
        raise CheckpointError(
            "asr_fx.save needs to know how to rebuild the model: pass factory='package.module:function' "
            "(and factory_kwargs=), or build the model with asr_fx.build(...)"
        )
    if config.get("attention") is None:
        raise CheckpointError("the attention network was given as an object with no import path; register it by name")
    kwargs = factory_kwargs if factory_kwargs is not None else (recorded.get("kwargs") or {})
    shape = list(input_shape) if input_shape is not None else config.get("input_shape")
    asr = {k: v for k, v in config.items() if k not in ("factory", "input_shape")}
    atomic_torch_save(
        {
            "format": FORMAT,
            "version": VERSION,
            "factory": factory,
            "factory_kwargs": dict(kwargs),
            "asr": asr,
            "input_shape": shape,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{str(path)!r} holds pickled Python objects (a whole module?), which can run code when loaded; "
                "re-save it with asr_fx.save or as a state_dict, or pass --trust-checkpoint if you trust its source"
            ) from exc
        raise CheckpointError(f"{str(path)!r} is not a readable torch checkpoint: {first}") from exc


def instrument_from_config(model: nn.Module, config: dict[str, Any], input_shape: Any = None) -> nn.Module:
    """Re-instrument a vanilla model exactly as recorded: same sites, attention and options."""
    from asr_fx.api import instrument

    psi_init = config.get("psi_init", 0.1)
    example = (torch.zeros(input_shape),) if input_shape else None
    return instrument(
        model,
        attention=config["attention"] if ":" not in str(config["attention"]) else import_factory(config["attention"]),
        rule=config.get("rule", "auto"),
        sites=[s["node"] for s in config["sites"]] if config.get("sites") else None,
        delta=config.get("delta", 1),
        activation=config.get("activation", "sigmoid"),
        psi_init=tuple(psi_init) if isinstance(psi_init, list) else psi_init,
        learnable_psi=config.get("learnable_psi", True),
        attention_kwargs=config.get("attention_kwargs") or {},
        example_inputs=example,
        preset=config.get("preset"),
    )


def load(path: str | os.PathLike) -> nn.Module:
    """Load an :func:`save` checkpoint: rebuild, re-instrument, load the state_dict (strict)."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an asr-fx checkpoint (no 'format': 'asr-fx' entry)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {ckpt.get('version')}; this asr-fx reads {VERSION}")
    model = build(ckpt["factory"], **ckpt.get("factory_kwargs", {}))
    instrumented = instrument_from_config(model, ckpt["asr"], ckpt.get("input_shape"))
    missing, unexpected = instrumented.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    from asr_fx.api import get_config, set_config

    config = dict(get_config(instrumented) or {})
    config["input_shape"] = ckpt.get("input_shape")
    config["sites"] = ckpt["asr"].get("sites", config.get("sites"))
    config["rule"] = ckpt["asr"].get("rule", config.get("rule"))
    set_config(instrumented, config)
    return instrumented.eval()
