"""``ASRConfig``: how a model was instrumented, the one record ``instrument``, ``save``/``load``,
the CLI and the stripe tools read and write.

It lives on the instrumented module as ``module.asr_fx_config`` (kept across ``copy.deepcopy`` and
pickling, see :func:`set_config`). Models pickled by older asr-fx versions kept a plain dict there
and a copy in ``gm.meta["asr_fx"]``; :func:`asr_config` reads either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from asr_fx.errors import CheckpointError

#: the config format written by this asr-fx; a dict without ``"version"`` is version 0 (asr-fx 0.1
#: before ASRConfig), read the same way except where :meth:`ASRConfig.from_dict` says; version 1 called
#: ``bn_affine_form`` ``norm_fused``
VERSION = 2
#: keys that earlier config versions spelled otherwise: old key -> key
RENAMED_KEYS = {"norm_fused": "bn_affine_form"}
#: where models of earlier asr-fx versions also kept the config: ``gm.meta[META_KEY]``
META_KEY = "asr_fx"
ATTRIBUTE = "asr_fx_config"
#: torch.fx's ``GraphModule.meta`` entry naming the attributes its ``copy.deepcopy`` keeps
PRESERVED = _USER_PRESERVED_ATTRIBUTES_KEY


@dataclass
class ASRConfig:
    """The options of :func:`asr_fx.instrument` and what it found (``sites``), as plain data."""

    attention: str | None = "se"
    """a registered name or ``"package.module:Factory"``; None when the factory has no import path"""
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    rule: str = "auto"
    delta: int = 1
    activation: str = "sigmoid"
    psi_init: float | list = 0.1
    """a number, or ``["normal", std]``"""
    learnable_psi: bool = True
    preset: str | None = None
    convert_existing: bool = False
    bn_affine_form: bool | None = None
    """the BN-affine training form at BatchNorm sites; None: on when ``delta == 1`` (as :func:`asr_fx.instrument`)"""
    sites: list[dict[str, Any]] | None = None
    """one :meth:`Site.to_dict` per chosen site; None: let placement choose again"""
    factory: dict[str, Any] | None = None
    """``{"factory": "package.module:function", "kwargs": {...}}`` when built with :func:`asr_fx.build`"""
    input_shape: list[int] | None = None
    parts: list[str] | None = None
    """paths of the instrumented parts when the model's whole forward did not trace (partial capture)"""
    part_input_shapes: dict[str, list[list[int] | None]] | None = None
    """each part's input shapes on the example inputs (its probe for ``fuse``)"""
    part_input_kinds: dict[str, list[dict[str, Any] | None]] | None = None
    """each part input that is no floating-point tensor (token ids, a mask): its dtype and the range of its example
    values, ``{"dtype": "int64", "low": 0, "high": 99}``, so that a probe for it takes such values; None for the
    others"""
    refused_parts: list[str] | None = None
    """parts that traced but were refused, each with its reason"""
    form: str | None = None
    """``"module"``: the blocks are attached to the model's own modules (:mod:`asr_fx.own_model`);
    ``"graph"`` or None (configs written before the module form): the model is a GraphModule"""
    graph_reason: str | None = None
    """why the graph form was used (a site with no place in the model's modules)"""
    leaf_modules: list[str] | None = None
    """the ``leaf_modules`` instrument was given: module paths, classes as ``"package.module:Class"``"""

    @property
    def resolved_bn_affine_form(self) -> bool:
        """``bn_affine_form`` with None resolved as :func:`asr_fx.instrument` resolves it."""
        return self.delta == 1 if self.bn_affine_form is None else bool(self.bn_affine_form)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (loadable with ``torch.load(weights_only=True)``), with ``"version"``."""
        return {"version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ASRConfig:
        """Read a config dict of this or an earlier version; unknown keys are ignored.

        Keys of earlier versions read under their current names (:data:`RENAMED_KEYS`: version 1's
        ``norm_fused`` is ``bn_affine_form``). A version-0 dict (no ``"version"``) without it was recorded
        before that option existed, when no model had the training form: it reads as ``False``."""
        version = data.get("version", 0)
        if not isinstance(version, int) or version > VERSION:
            raise CheckpointError(f"the ASR config has version {version!r}; this asr-fx reads up to {VERSION}: "
                                  "upgrade asr-fx")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {RENAMED_KEYS.get(k, k): v for k, v in data.items() if RENAMED_KEYS.get(k, k) in known}
        if version == 0 and "bn_affine_form" not in values:
            values["bn_affine_form"] = False
        values["attention_kwargs"] = dict(values.get("attention_kwargs") or {})
        return cls(**values)

    def instrument_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`asr_fx.instrument` that re-create this placement and these blocks
        (``attention`` as recorded: resolve a name the caller does not have registered first)."""
        psi_init = tuple(self.psi_init) if isinstance(self.psi_init, list) else self.psi_init
        return {
            "attention": self.attention,
            "rule": self.rule,
            "sites": [s["node"] for s in self.sites] if self.sites is not None else None,
            "delta": self.delta,
            "activation": self.activation,
            "psi_init": psi_init,
            "learnable_psi": self.learnable_psi,
            "attention_kwargs": dict(self.attention_kwargs),
            "preset": self.preset,
            "convert_existing": self.convert_existing,
            "bn_affine_form": self.resolved_bn_affine_form,
        }


def set_config(module: nn.Module, config: ASRConfig | dict[str, Any] | None) -> None:
    """Record ``config`` on ``module`` as ``module.asr_fx_config`` (None removes it, from the old places too).

    That attribute is the one record. Pickling keeps it; a GraphModule's ``copy.deepcopy`` keeps only
    the attributes named in ``meta["_user_preserved_attributes"]`` (torch.fx's mechanism), so it is
    named there too."""
    module.__dict__.pop(ATTRIBUTE, None)
    meta = module.__dict__.get("meta")
    if isinstance(meta, dict):
        meta.pop(META_KEY, None)  # asr-fx 0.1 kept a copy here: one record now
        meta.get(PRESERVED, {}).pop(ATTRIBUTE, None)
    if config is None:
        return
    config = config if isinstance(config, ASRConfig) else ASRConfig.from_dict(config)
    module.__dict__[ATTRIBUTE] = config
    if isinstance(meta, dict):
        meta.setdefault(PRESERVED, {})[ATTRIBUTE] = config


def asr_config(model: nn.Module) -> ASRConfig | None:
    """The :class:`ASRConfig` recorded on ``model``, or None (also read from older models' dicts)."""
    recorded = model.__dict__.get(ATTRIBUTE)
    if recorded is None:
        meta = model.__dict__.get("meta")
        recorded = meta.get(META_KEY) if isinstance(meta, dict) else None
    if recorded is None:
        return None
    return recorded if isinstance(recorded, ASRConfig) else ASRConfig.from_dict(recorded)


def get_config(model: nn.Module) -> dict[str, Any] | None:
    """The config :func:`asr_fx.instrument` recorded on ``model`` as a plain dict, or None."""
    config = asr_config(model)
    return None if config is None else config.to_dict()
