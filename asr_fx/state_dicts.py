"""Finding, normalising and checking the state_dict inside a training checkpoint.

Training code saves weights in many shapes: a bare state_dict, ``{"state_dict": ...}`` (Lightning),
``{"model": ...}`` (DDP and most training loops), with key prefixes from the wrappers it trained
under: ``module.`` (DistributedDataParallel / DataParallel), ``model.`` (a LightningModule holding
the network as ``self.model``), ``_orig_mod.`` (``torch.compile``). These helpers turn any of them
into the state_dict of the plain model, and say clearly what does not fit.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from asr_fx._util import non_finite_kind
from asr_fx.attention import matching_attention
from asr_fx.errors import CheckpointError, StateDictMismatchError

#: where training checkpoints keep the model's weights, tried in this order
STATE_DICT_ENTRIES = ("state_dict", "model", "model_state_dict", "module", "net", "network")

#: prefixes that wrappers add to every key, stripped when that makes the keys fit the model
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")

COMPILE_PREFIX = "_orig_mod."


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping from strings to tensors."""
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def find_state_dict(obj: Any, source: str = "the checkpoint") -> tuple[Any, str]:
    """``(weights, where)``: the state_dict (or a pickled ``nn.Module``) inside a loaded checkpoint.

    ``where`` describes the format, e.g. ``"bare state_dict"`` or ``"training checkpoint ['model']"``.
    """
    if isinstance(obj, nn.Module):
        return obj, "pickled module"
    if is_state_dict(obj):
        return obj, "bare state_dict"
    if isinstance(obj, Mapping):
        for entry in STATE_DICT_ENTRIES:
            value = obj.get(entry)
            if isinstance(value, nn.Module):
                return value, f"pickled module in [{entry!r}]"
            if is_state_dict(value):
                return value, f"training checkpoint [{entry!r}]"
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise CheckpointError(
            f"found no state_dict in {source}: a dict with keys {keys}; expected a state_dict "
            f"(names -> tensors) or one under {', '.join(repr(e) for e in STATE_DICT_ENTRIES[:3])}"
        )
    raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict or a dict holding one")


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _candidates(keys: Iterable[str]) -> list[str]:
    """Prefix chains that all keys share or that some keys start with (Lightning keeps other modules beside
    ``model.``)."""
    out = [""]
    frontier = [""]
    for _ in range(3):
        nxt = []
        for base in frontier:
            for p in WRAPPER_PREFIXES:
                chain = base + p
                if any(k.startswith(chain) for k in keys) and chain not in out:
                    out.append(chain)
                    nxt.append(chain)
        frontier = nxt
    return out


def normalize_keys(state_dict: Mapping[str, torch.Tensor],
                   expected: Iterable[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes so the keys fit ``expected`` (the model's keys) best.

    ``_orig_mod.`` is removed wherever it appears (``torch.compile`` inserts it at the compiled
    module). Then, of the prefix chains made of ``module.`` and ``model.``, the one under which the
    most keys match ``expected`` is stripped (keys outside it are dropped and noted). Returns the
    new state_dict and notes for the user, e.g. ``["stripped the prefix 'module.'"]``.
    """
    expected = set(expected)
    notes: list[str] = []
    sd = dict(state_dict)
    if not any(COMPILE_PREFIX in k for k in expected) and any(COMPILE_PREFIX in k for k in sd):
        sd = {k.replace(COMPILE_PREFIX, ""): v for k, v in sd.items()}
        notes.append("removed torch.compile's '_orig_mod.'")
    best, best_score = "", len(expected & set(sd))
    for chain in _candidates(sd):
        score = len(expected & set(_strip(sd, chain)))
        if score > best_score:
            best, best_score = chain, score
    if best:
        dropped = [k for k in sd if not k.startswith(best)]
        sd = _strip(sd, best)
        notes.append(f"stripped the prefix {best!r}"
                     + (f", ignored {len(dropped)} key(s) outside it" if dropped else ""))
    return sd, notes


def _nearest(key: str, pool: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(pool), n=1, cutoff=0.5)
    return f" (nearest: {match[0]})" if match else ""


def _listing(keys: list[str], pool: Iterable[str], limit: int = 5) -> str:
    pool = list(pool)
    shown = ", ".join(f"{k}{_nearest(k, pool)}" for k in keys[:limit])
    return shown + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


def check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], hint: str = "", attention: Any = None) -> None:
    """Raise one :class:`StateDictMismatchError` (a :class:`CheckpointError`) listing missing and unexpected
    keys (with the nearest match on the other side, by ``difflib``) and mismatched shapes.

    ``attention``: the registered name of the attention network the model's ASR blocks were built
    with; when the ``asr.*`` keys do not fit and look like another registered network, the error
    names that one (``.attention``). Not given (or an import path, a factory): nothing is named."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (in the model, not in the checkpoint): "
                        f"{_listing(missing, unexpected or state_dict)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (in the checkpoint, not in the model): "
                        f"{_listing(unexpected, missing or own)}")
    if shapes:
        more = f", ... {len(shapes) - 5} more" if len(shapes) > 5 else ""
        problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:5])}{more}")
    if not problems:
        return
    asr_keys = any(k.startswith("asr.") for k in state_dict)
    named = isinstance(attention, str) and ":" not in attention
    looks_like = matching_attention(state_dict) if asr_keys and named else None
    if looks_like is not None and looks_like == attention.lower():
        looks_like = None  # the keys fit that network: the problem is elsewhere
    if looks_like is not None:  # name the network instead of listing every key of the wrong one
        examples = ", ".join(asr[0] for keys in (missing, unexpected)
                             if (asr := [k for k in keys if k.startswith("asr.")]))
        raise StateDictMismatchError(
            f"the checkpoint does not fit the model: its asr.* keys look like the attention network {looks_like!r}, "
            f"not {attention!r} ({len(missing)} missing, {len(unexpected)} unexpected and {len(shapes)} mismatched "
            f"key(s), e.g. {examples}); pass attention={looks_like!r}", missing=missing, unexpected=unexpected,
            mismatched=shapes, asr_keys=asr_keys, attention=looks_like)
    raise StateDictMismatchError("the checkpoint does not fit the model: " + "; ".join(problems)
                                 + (f". {hint}" if hint else ""), missing=missing, unexpected=unexpected,
                                 mismatched=shapes, asr_keys=asr_keys, attention=looks_like)


def check_finite_asr(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse NaN/Inf in ``psi`` or an attention network's weights, naming the ASR site."""
    bad = []
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] != "asr" or len(parts) < 3 or not value.is_floating_point():
            continue
        kind = non_finite_kind(value)
        if kind:
            what = "psi" if parts[-1] == "psi" else "attention weights"
            bad.append(f"{what} of ASR site `asr.{parts[1]}` ({key}) holds {kind}")
    if bad:
        raise CheckpointError("non-finite values in the checkpoint: " + "; ".join(bad[:5])
                              + ". Fusing would poison the weights: restore an earlier checkpoint or retrain")


def asr_layout(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], int]:
    """``(site keys, delta)`` read from ``asr.<site>[.<i>].psi`` keys; ``([], 1)`` when not instrumented."""
    sites: dict[str, int] = {}
    for key in state_dict:
        parts = key.split(".")
        if parts[0] == "asr" and parts[-1] == "psi" and len(parts) >= 3:
            depth = int(parts[2]) + 1 if len(parts) == 4 and parts[2].isdigit() else 1
            sites[parts[1]] = max(sites.get(parts[1], 1), depth)
    delta = max(sites.values()) if sites else 1
    return list(sites), delta


def with_version_metadata(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with a ``_metadata`` (each module's state_dict version) to load into ``model``: its own, where
    ``state`` was built key by key and so lost the one ``state_dict()`` carries; a layer whose
    ``_load_from_state_dict`` reads its version (torchvision's MNASNet) refuses a state without it."""
    if getattr(state, "_metadata", None) is not None:
        return dict(state) if not isinstance(state, dict) else state
    out = OrderedDict(state)
    out._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return out
