"""Read a ``torch.distributed.checkpoint`` (DCP) directory, what FSDP2 training writes, in one process.

:func:`read_dcp` gathers every shard into one plain state dict (CPU tensors, the nesting the
checkpoint was saved with), without a process group. Nothing in it runs pickled code unless
``trust=True``: DCP's own reader unpickles ``.metadata`` with plain ``pickle`` and every non-tensor
entry with ``torch.load(weights_only=False)``; here the metadata is read by an unpickler that builds
only DCP's metadata classes and torch's sizes and dtypes, and non-tensor entries load with
``weights_only=True``.

An asr-fx header (:func:`asr_fx.checkpoint.checkpoint_header`) saved beside the weights makes the
directory a full asr-fx checkpoint::

    dcp.save({"model": model.state_dict(), "asr_fx": asr_fx.checkpoint_header(model)}, checkpoint_id=DIR)

``asr_fx.load(DIR)`` and ``asr-fx fuse DIR`` then need nothing else; without it, ``asr-fx fuse DIR
--model package.module:factory`` rebuilds the sites from the ``asr.*`` keys, as for any state_dict.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from asr_fx.errors import CheckpointError

METADATA = ".metadata"

#: the modules whose classes (dataclasses, enums; never functions) a DCP ``.metadata`` pickle may build
_SAFE_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.")
#: and these few globals besides (torch's sizes and layouts, the path DCP records)
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                 ("pathlib", "PureWindowsPath"), ("torch", "device"), ("builtins", "set"), ("builtins", "frozenset")}


def is_dcp_dir(path: str | os.PathLike) -> bool:
    """``path`` is a folder that holds a DCP checkpoint (its ``.metadata`` file)."""
    return Path(path).is_dir() and (Path(path) / METADATA).is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses, torch sizes and dtypes; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(_SAFE_MODULES):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


class _Reader(FileSystemReader):
    """DCP's file reader, its ``.metadata`` read by :class:`_MetadataUnpickler` unless ``trust``."""

    def __init__(self, path: str, trust: bool) -> None:
        super().__init__(path)
        self.trust = trust

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if self.trust:
            return super().read_metadata(*args, **kwargs)
        with open(Path(self.path) / METADATA, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(DefaultLoadPlanner):
    """DCP's load planner, its non-tensor entries loaded with ``weights_only=True`` unless ``trust``."""

    def __init__(self, trust: bool) -> None:
        super().__init__(flatten_state_dict=False)
        self.trust = trust

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=not self.trust)


def _unflatten(flat: dict[str, Any], mapping: dict[str, Any]) -> dict[str, Any]:
    """The nested dict DCP flattened on save: ``mapping`` (its ``planner_data``) gives each key's path."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        path = mapping.get(key) or (key,)
        node: Any = out
        for part, following in zip(path[:-1], path[1:]):
            if isinstance(node, list):
                while len(node) <= part:
                    node.append(None)
                if node[part] is None:
                    node[part] = [] if isinstance(following, int) else {}
                node = node[part]
            else:
                node = node.setdefault(part, [] if isinstance(following, int) else {})
        if isinstance(node, list):
            while len(node) <= int(path[-1]):
                node.append(None)
        node[path[-1]] = value
    return out


def read_dcp(path: str | os.PathLike, *, trust: bool = False) -> dict[str, Any]:
    """Every entry of the DCP checkpoint in folder ``path``, shards joined, on the CPU, nested as saved.

    Refuses (:class:`CheckpointError`) a folder without ``.metadata``, metadata that would build other
    objects than DCP's own (``trust=True`` reads it with DCP's plain unpickler), and a broken checkpoint.
    """
    folder = Path(path)
    if not is_dcp_dir(folder):
        raise CheckpointError(f"{str(folder)!r} is not a torch.distributed.checkpoint folder (no {METADATA} file in "
                              "it)",
                              path=str(folder))
    reader = _Reader(str(folder), trust)
    try:
        metadata = reader.read_metadata()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{str(folder / METADATA)!r} would build {exc} when unpickled, which is not part of a DCP checkpoint's "
            "metadata and could run code: pass trust=True (--trust-checkpoint) only if you trust its source",
            path=str(folder), reason="pickled") from exc
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign .metadata file
        raise CheckpointError(f"{str(folder / METADATA)!r} is not readable DCP metadata: {type(exc).__name__}: {exc}",
                              path=str(folder)) from exc
    flat: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            flat[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        elif isinstance(meta, BytesStorageMetadata):
            flat[key] = None
    planner = _Planner(trust)
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp_load(flat, storage_reader=reader, planner=planner, no_dist=True)
    except Exception as exc:  # noqa: BLE001 - DCP wraps a missing shard file or a bad entry in its own errors
        text = str(exc).strip().splitlines()
        reason = "pickled" if not trust and any("weights_only" in line or "GLOBAL" in line for line in text) else None
        raise CheckpointError(f"cannot read the DCP checkpoint {str(folder)!r}: "
                              f"{text[0] if text else type(exc).__name__}"
                              + ("; it holds pickled Python objects: pass trust=True (--trust-checkpoint) only if "
                                 "you trust its source" if reason else ""), path=str(folder), reason=reason) from exc
    flat.update(planner.state_dict)  # dcp.load hands the planner a copy of ``flat``: the non-tensor entries are there
    return _unflatten(flat, dict(metadata.planner_data or {}))
