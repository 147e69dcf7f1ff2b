"""Checkpoints of instrumented models: plain types and tensors, loadable with ``weights_only=True``.

Format (``format == "asr-fx"``, ``version == 1``)::

    {"format": "asr-fx", "version": 1,
     "factory": "package.module:function", "factory_kwargs": {...},
     "asr": {... the config instrument() recorded, sites included ...},
     "input_shape": [N, C, H, W] or None,
     "state_dict": {...}}
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asr_fx.errors import CheckpointError
from asr_fx.factory import build, import_factory
from asr_fx.state_dicts import asr_layout, check_finite_asr, check_keys, find_state_dict, normalize_keys

FORMAT = "asr-fx"
VERSION = 1


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished temporary file ``tmp`` to ``path`` with the permissions a new file gets
    (``mkstemp`` makes it owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_saveable_attention(attention: Any) -> None:
    """A checkpoint records the attention network by name or import path; refuse one that cannot be imported back."""
    way_out = ("register it under a name (asr_fx.attention.register('name', Factory) in the code that loads the "
               "checkpoint too) or define it in an importable module (then it is saved as 'package.module:Factory')")
    if attention is None:
        raise CheckpointError("cannot save: the attention network was given as a lambda, a local class or another "
                              f"object with no import path; {way_out}")
    if isinstance(attention, str) and attention.split(":", 1)[0] == "__main__":
        raise CheckpointError(f"cannot save: the attention network {attention!r} is defined in the script being run "
                              f"(__main__), which asr_fx.load and the asr-fx CLI cannot import; {way_out}")


def _check_output_path(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot save to {str(path)!r}: it is a folder; name the checkpoint file")
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save to {str(path)!r}: the folder {str(path.parent)!r} does not exist")


def resolve_attention(attention: Any) -> Any:
    """A registered name as it is; ``"package.module:Factory"`` imported; refuses an unknown name with the way out."""
    from asr_fx.attention import names

    if not isinstance(attention, str):
        return attention
    if ":" in attention:
        if attention.split(":", 1)[0] == "__main__":
            raise CheckpointError(f"the attention network {attention!r} was defined in the training script "
                                  "(__main__) and cannot be imported: move it into a module and pass --attention "
                                  "package.module:Factory")
        return import_factory(attention)
    if attention.lower() not in names():
        raise CheckpointError(
            f"the attention network {attention!r} is not registered here (registered: {', '.join(names())}); "
            "a custom one was registered by the code that trained the model: pass its import path, --attention "
            "package.module:Factory (attention_kwargs with --attention-args), or in Python call "
            f"asr_fx.attention.register({attention!r}, Factory) before loading"
        )
    return attention


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
    _check_saveable_attention(config.get("attention"))
    _check_output_path(path)
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


def _describe_global(message: str) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return f" (it needs {match.group(1)})" if match else ""


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Any:
    """``torch.load(path, weights_only=not trust)`` with one-line errors for every way it can fail.

    Refuses a missing or empty file, bytes that are not a torch file, a truncated zip archive, and
    (unless ``trust``) pickled Python objects, which can run code when loaded.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    if head == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{str(path)!r} is a truncated or corrupt torch checkpoint (its zip archive has "
                                  "no central directory): copy or save it again")
    elif head[0] != 0x80:  # neither torch.save's zip archive nor a legacy pickle
        raise CheckpointError(f"{str(path)!r} is not a torch checkpoint: it does not start like a file torch.save "
                              f"writes (first bytes {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        if not trust and ("Unsupported global" in text or "GLOBAL" in text):
            raise CheckpointError(
                f"{str(path)!r} holds pickled Python objects{_describe_global(text)}, not only tensors, and "
                "loading those can run arbitrary code (torch.load weights_only=True refuses them): save a "
                "state_dict or use asr_fx.save, or pass --trust-checkpoint if you trust the file's source"
            ) from exc
        raise CheckpointError(f"{str(path)!r} is not a readable torch checkpoint: {first}") from exc


def instrument_from_config(model: nn.Module, config: dict[str, Any], input_shape: Any = None,
                           leaf_modules: Any = None) -> nn.Module:
    """Re-instrument a vanilla model exactly as recorded: same sites, attention and options."""
    from asr_fx.api import instrument

    psi_init = config.get("psi_init", 0.1)
    example = (torch.zeros(input_shape),) if input_shape else None
    return instrument(
        model,
        attention=resolve_attention(config["attention"]),
        rule=config.get("rule", "auto"),
        sites=[s["node"] for s in config["sites"]] if config.get("sites") is not None else None,
        delta=config.get("delta", 1),
        activation=config.get("activation", "sigmoid"),
        psi_init=tuple(psi_init) if isinstance(psi_init, list) else psi_init,
        learnable_psi=config.get("learnable_psi", True),
        attention_kwargs=config.get("attention_kwargs") or {},
        example_inputs=example,
        leaf_modules=leaf_modules,
        preset=config.get("preset"),
        convert_existing=config.get("convert_existing", False),
        norm_fused=config.get("norm_fused", False),
    )


def _from_asr_fx(ckpt: dict[str, Any], path: str | os.PathLike, leaf_modules: Any = None,
                 attention: str | None = None, attention_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The instrumented model an asr-fx checkpoint describes, weights loaded (strict). ``attention``
    (a name or ``"package.module:Factory"``) and ``attention_kwargs`` replace the recorded ones."""
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {ckpt.get('version')}; this asr-fx reads {VERSION}")
    model = build(ckpt["factory"], **ckpt.get("factory_kwargs", {}))
    asr = dict(ckpt["asr"])
    if attention is not None:
        asr["attention"] = attention
    if attention_kwargs is not None:
        asr["attention_kwargs"] = attention_kwargs
    instrumented = instrument_from_config(model, asr, ckpt.get("input_shape"), leaf_modules)
    check_finite_asr(ckpt["state_dict"])
    check_keys(instrumented, ckpt["state_dict"], hint=f"Was it saved from {ckpt['factory']} with these factory_kwargs?")
    instrumented.load_state_dict(ckpt["state_dict"])
    from asr_fx.api import get_config, set_config

    config = dict(get_config(instrumented) or {})
    config["input_shape"] = ckpt.get("input_shape")
    config["sites"] = ckpt["asr"].get("sites", config.get("sites"))
    config["rule"] = ckpt["asr"].get("rule", config.get("rule"))
    set_config(instrumented, config)
    return instrumented.eval()


def load(path: str | os.PathLike) -> nn.Module:
    """Load an :func:`save` checkpoint: rebuild, re-instrument, load the state_dict (strict)."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an asr-fx checkpoint (no 'format': 'asr-fx' entry)")
    return _from_asr_fx(ckpt, path)


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
    vanilla.load_state_dict({k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}, strict=False)
    return vanilla.eval()


def _shape_hint(*sources: Any) -> list[int] | None:
    for source in sources:
        shape = source.get("input_shape") if isinstance(source, dict) else getattr(source, "input_shape", None)
        if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) for d in shape):
            return list(shape)
    return None


def _runs_on(model: nn.Module, shape: list[int]) -> torch.Tensor:
    """A zero input of ``shape`` after checking that ``model`` runs on it (one clear error if not)."""
    from asr_fx.errors import ASRError

    x = torch.zeros(shape)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:  # noqa: BLE001
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ASRError(f"the model does not run on an input of shape {list(shape)}: {type(exc).__name__}: {first}; "
                       "pass the shape it expects with --input-shape") from exc
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
    from asr_fx.api import get_config, instrument

    raw = read_checkpoint(path, trust=trust)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        options = asr_options or {}
        model = _from_asr_fx(raw, path, leaf_modules, options.get("attention"), options.get("attention_kwargs"))
        vanilla = _vanilla_with_weights(raw["factory"], raw.get("factory_kwargs", {}), raw["state_dict"])
        return LoadedCheckpoint(model, vanilla, "asr-fx", input_shape or raw.get("input_shape"))
    weights, kind = find_state_dict(raw, repr(str(path)))
    kwargs = dict(factory_kwargs or {})
    if isinstance(weights, nn.Module):
        model = weights.eval()
        check_finite_asr(model.state_dict())
        recorded = (get_config(model) or {}).get("factory") or {}
        vanilla = None
        if factory or recorded.get("factory"):
            vanilla = _vanilla_with_weights(factory or recorded["factory"], kwargs if factory else recorded.get("kwargs") or {},
                                            model.state_dict())
        shape = input_shape or _shape_hint(get_config(model) or {}, raw if isinstance(raw, dict) else None, model)
        return LoadedCheckpoint(model, vanilla, kind, shape)
    if factory is None:
        raise CheckpointError(f"{str(path)!r} is a {kind}: it holds weights but not how to build the model; pass "
                              "--model package.module:factory (and --factory-args '{...}' for its arguments)")
    base = build(factory, **kwargs).eval()
    state_dict, notes = normalize_keys(weights, base.state_dict().keys())
    shape = input_shape or _shape_hint(raw, base)
    sites, delta = asr_layout(state_dict)
    hint = f"Check --model {factory} and --factory-args"
    if sites and get_config(base) is None and not any(k.startswith("asr.") for k in base.state_dict()):
        options = dict(asr_options or {})
        if options.get("sites") is None and options.get("rule") is None:
            options["sites"] = sites
        options.setdefault("delta", delta)
        options = {k: v for k, v in options.items() if v is not None}
        if "attention" in options:
            options["attention"] = resolve_attention(options["attention"])
        example = (_runs_on(base, shape),) if shape else None
        model = instrument(copy.deepcopy(base), example_inputs=example, leaf_modules=leaf_modules, **options)
        hint += ", and the ASR options it was trained with (--attention, --attention-args, --delta, --sites)"
        notes.append(f"instrumented again at {len(sites)} site(s) from the checkpoint's asr.* keys")
    else:
        model, base = base, None
        if not sites:
            notes.append("no asr.* keys: the model is fused as the factory builds it")
    check_finite_asr(state_dict)
    check_keys(model, state_dict, hint=hint)
    model.load_state_dict(state_dict)
    vanilla = None
    if base is not None:
        vanilla = _vanilla_with_weights(factory, kwargs, state_dict)
    return LoadedCheckpoint(model.eval(), vanilla, kind, shape, notes)
