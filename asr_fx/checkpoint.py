"""Checkpoints of instrumented models: plain types and tensors, loadable with ``weights_only=True``.

Format (``format == "asr-fx"``, ``version == 1``)::

    {"format": "asr-fx", "version": 1,
     "factory": "package.module:function", "factory_kwargs": {...},
     "asr": {... the config instrument() recorded, sites included ...},
     "input_shape": [N, C, H, W] or None,
     "state_dict": {...}}

A ``torch.distributed.checkpoint`` (DCP) folder, what FSDP2 training writes, is read too
(:mod:`asr_fx.dcp`): with the header of :func:`checkpoint_header` saved beside the weights it is a
full asr-fx checkpoint for :func:`load`.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asr_fx import atomic
from asr_fx.api import instrument
from asr_fx.attention import names as attention_names
from asr_fx.attention import widths_from_state_dict
from asr_fx.config import ASRConfig, asr_config, set_config
from asr_fx.dcp import is_dcp_dir, read_dcp
from asr_fx.equivalence import random_probe
from asr_fx.errors import CheckpointError, OutputPathError
from asr_fx.factory import build, import_factory
from asr_fx.state_dicts import check_finite_asr, check_keys, find_state_dict, with_version_metadata

FORMAT = "asr-fx"
VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in a private folder beside ``path``, then rename: never a
    half-written file (see :mod:`asr_fx.atomic`)."""
    with atomic.atomic_output(path) as tmp:
        torch.save(obj, tmp)


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


def resolve_attention(attention: Any) -> Any:
    """A registered name as it is; ``"package.module:Factory"`` imported; refuses an unknown name with the way out."""
    if not isinstance(attention, str):
        return attention
    if ":" in attention:
        if attention.split(":", 1)[0] == "__main__":
            raise CheckpointError(f"the attention network {attention!r} was defined in the training script "
                                  "(__main__) and cannot be imported: move it into a module and pass its import "
                                  "path, attention='package.module:Factory'", reason="attention")
        return import_factory(attention)
    if attention.lower() not in attention_names():
        raise CheckpointError(
            f"the attention network {attention!r} is not registered here (registered: {', '.join(attention_names())}); "
            "a custom one was registered by the code that trained the model: pass its import path, "
            "attention='package.module:Factory' (and its attention_kwargs), or call "
            f"asr_fx.attention.register({attention!r}, Factory) before loading", reason="attention"
        )
    return attention


def checkpoint_header(
    model: nn.Module,
    *,
    factory: str | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    input_shape: list[int] | tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Everything an asr-fx checkpoint holds but the weights: format, factory, ASR config, input shape
    (plain types only). Saved beside a sharded state dict it makes a DCP folder loadable by :func:`load`
    and ``asr-fx fuse DIR``::

        dcp.save({"model": model.state_dict(), "asr_fx": asr_fx.checkpoint_header(model)}, checkpoint_id=DIR)

    Arguments as for :func:`save`.
    """
    config = asr_config(model)
    if config is None:
        raise CheckpointError("this model was not made by asr_fx.instrument: save its state_dict with torch.save "
                              "instead")
    recorded = config.factory or {}
    factory = factory or recorded.get("factory")
    if factory is None:
        raise CheckpointError(
            "asr_fx.save needs to know how to rebuild the model: pass factory='package.module:function' "
            "(and factory_kwargs=), or build the model with asr_fx.build(...)"
        )
    _check_saveable_attention(config.attention)
    kwargs = factory_kwargs if factory_kwargs is not None else (recorded.get("kwargs") or {})
    shape = list(input_shape) if input_shape is not None else config.input_shape
    asr = {k: v for k, v in config.to_dict().items() if k not in ("factory", "input_shape")}
    return {"format": FORMAT, "version": VERSION, "factory": factory, "factory_kwargs": dict(kwargs), "asr": asr,
            "input_shape": shape}


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
    recorded by :func:`build`. ``input_shape`` is what the CLI exports with. For a sharded (FSDP2)
    model, save a DCP folder with :func:`checkpoint_header` instead.
    """
    header = checkpoint_header(model, factory=factory, factory_kwargs=factory_kwargs, input_shape=input_shape)
    try:
        atomic.check_writable(path)
    except OutputPathError as exc:
        raise CheckpointError(f"cannot save: {exc}", path=exc.path) from None
    atomic_torch_save({**header, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


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
    if is_dcp_dir(path):
        return dcp_checkpoint(read_dcp(path, trust=trust), path)
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
                "state_dict or use asr_fx.save, or load it with trust=True if you trust the file's source",
                path=str(path), reason="pickled"
            ) from exc
        raise CheckpointError(f"{str(path)!r} is not a readable torch checkpoint: {first}") from exc


#: where :func:`checkpoint_header` goes in a DCP folder
DCP_HEADER = "asr_fx"


def dcp_checkpoint(entries: dict[str, Any], path: str | os.PathLike) -> Any:
    """What a DCP folder's entries amount to: with an asr-fx header (:data:`DCP_HEADER`), an asr-fx checkpoint
    (the header and the one state dict beside it); without, the entries as they are (a training checkpoint)."""
    header = entries.get(DCP_HEADER)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return entries
    rest = {k: v for k, v in entries.items() if k != DCP_HEADER}
    weights, _ = find_state_dict(rest if len(rest) != 1 else next(iter(rest.values())), repr(str(path)))
    return {**header, "state_dict": dict(weights)}


def instrument_from_config(model: nn.Module, config: ASRConfig | dict[str, Any], input_shape: Any = None,
                           leaf_modules: Any = None) -> nn.Module:
    """Re-instrument a vanilla model exactly as recorded: same sites, attention and options.

    ``bn_affine_form`` reads as :class:`ASRConfig` says: as recorded; unset in a current config, on when
    ``delta == 1`` (as :func:`asr_fx.instrument`); absent from a config older than the option, off."""
    config = config if isinstance(config, ASRConfig) else ASRConfig.from_dict(config)
    options = config.instrument_options()
    options["attention"] = resolve_attention(options["attention"])
    example = (random_probe(input_shape),) if input_shape else None
    return instrument(model, example_inputs=example, leaf_modules=leaf_modules, **options)


def graph_form_state(state: dict[str, torch.Tensor], recorded: ASRConfig, model: nn.Module) -> dict[str, torch.Tensor]:
    """A state_dict saved from the graph form (every checkpoint before the module form: ``recorded.form`` is
    None or ``"graph"``), for ``model`` in the module form: the graph form held only the modules its
    traced forward calls, so a vanilla key of a module the forward never calls is missing from it; those
    keep ``model``'s own values (the forward does not read them). Other states are returned as they are."""
    config = asr_config(model)
    if recorded.form not in (None, "graph") or config is None or config.form == "graph":
        return state
    own = model.state_dict()
    unused = {k: v for k, v in own.items() if k not in state and ".asr." not in f".{k}"}
    return {**unused, **state} if unused else state


def model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike, leaf_modules: Any = None,
                 attention: str | None = None, attention_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The instrumented model an asr-fx checkpoint describes, weights loaded (strict). ``attention``
    (a name or ``"package.module:Factory"``) and ``attention_kwargs`` replace the recorded ones."""
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {ckpt.get('version')}; this asr-fx reads "
                              f"{VERSION}",
                              path=str(path))
    model = build(ckpt["factory"], **ckpt.get("factory_kwargs", {}))
    recorded = ASRConfig.from_dict(ckpt["asr"])
    asr = ASRConfig.from_dict(recorded.to_dict())
    if attention is not None:
        asr.attention = attention
    if attention_kwargs is not None:
        asr.attention_kwargs = dict(attention_kwargs)
    # a checkpoint written before widths were recorded: its state_dict says what they were
    asr.attention_kwargs = {**widths_from_state_dict(asr.attention, ckpt["state_dict"]), **(asr.attention_kwargs or {})}
    instrumented = instrument_from_config(model, asr, ckpt.get("input_shape"), leaf_modules)
    state = graph_form_state(ckpt["state_dict"], recorded, instrumented)
    check_finite_asr(state)
    check_keys(instrumented, state, hint=f"Was it saved from {ckpt['factory']} with these factory_kwargs?",
               attention=asr.attention)
    instrumented.load_state_dict(with_version_metadata(state, instrumented))
    config = asr_config(instrumented) or asr
    config.input_shape = ckpt.get("input_shape")
    config.sites = recorded.sites if recorded.sites is not None else config.sites
    config.rule = recorded.rule
    set_config(instrumented, config)
    return instrumented.eval()


def load(path: str | os.PathLike) -> nn.Module:
    """Load an :func:`save` checkpoint: rebuild, re-instrument, load the state_dict (strict)."""
    ckpt = read_checkpoint(path)
    if is_dcp_dir(path) and (not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT):
        raise CheckpointError(
            f"{str(path)!r} is a torch.distributed.checkpoint folder without asr-fx's header, so it does not say how "
            f"to rebuild the model: save it as dcp.save({{'model': model.state_dict(), {DCP_HEADER!r}: "
            "asr_fx.checkpoint_header(model, factory='package.module:factory')}, checkpoint_id=DIR), or fuse it with "
            "asr-fx fuse DIR --model package.module:factory [--factory-args JSON] [--attention NAME] (the sites come "
            "from its asr.* keys)", path=str(path), reason="no-factory")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an asr-fx checkpoint (no 'format': 'asr-fx' entry)")
    return model_from_checkpoint(ckpt, path)


