"""Exceptions raised by asr-fx: one tree, every public error an :class:`ASRError`.

Library errors name the problem and carry it as data (the offending keyword, its nearest match,
the shapes, the path) in attributes, so a caller such as the CLI can phrase the way out in its own
words (its flags). They never name CLI flags themselves. This module imports nothing heavy (no torch),
so the CLI can import it before deciding whether a command needs torch.
"""

from __future__ import annotations

from typing import Any


class ASRError(Exception):
    """Base class of every error asr-fx raises on purpose."""


class TraceError(ASRError):
    """torch.fx could not trace the model; ``module`` is the path of the submodule it failed in (None:
    the model's own forward) and ``module_class`` that submodule's class name."""

    def __init__(self, message: str, *, module: str | None = None, module_class: str | None = None) -> None:
        super().__init__(message)
        self.module, self.module_class = module, module_class


class NoSitesError(ASRError):
    """Placement found no site for ASR; ``opaque_modules``: the modules the trace kept as one call because their
    forward branches on ``self.training`` (sites inside them are not seen from outside)."""

    def __init__(self, message: str, *, opaque_modules: list[str] | None = None) -> None:
        super().__init__(message)
        self.opaque_modules = list(opaque_modules or [])


class FusionError(ASRError):
    """``fuse(..., strict=True)`` left at least one site unfolded, or a fused model differs from the vanilla
    model (``asr_fx.testing.compare_with_vanilla``); ``report`` is the :class:`~asr_fx.fusion.FusionReport`."""

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report


class VerificationError(ASRError):
    """The exported model does not agree with the reference within tolerance; ``report`` is the ExportReport."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class CheckpointError(ASRError):
    """A checkpoint could not be read or does not fit the model; ``path`` is the file when known.

    ``reason`` is a short key when the way out is an option of the loader: ``"pickled"`` (it holds
    pickled objects: ``trust=True``), ``"no-factory"`` (weights without the factory that builds the
    model), ``"attention"`` (the attention network it names cannot be imported here), ``"keys"``
    (:class:`StateDictMismatchError`)."""

    def __init__(self, message: str, *, path: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


class InvalidOptionError(ASRError, ValueError):
    """An option or argument has a value asr-fx cannot use (an unknown rule, delta < 1, a batch that is not a
    tensor, a device that is not there, ...)."""


class ExportError(ASRError):
    """torch.onnx.export could not export the model (or wrote another opset than asked for).

    ``opset`` is the opset asked for when that was the problem, ``written_opset`` the one written."""

    def __init__(self, message: str, *, opset: int | None = None, written_opset: int | None = None) -> None:
        super().__init__(message)
        self.opset, self.written_opset = opset, written_opset


class UnknownAttentionError(ASRError, ValueError):
    """An attention name that is not registered (also a ``ValueError``, as before); ``name`` is the name
    asked for, ``registered`` the names that are."""

    def __init__(self, message: str, *, name: str | None = None, registered: list[str] | None = None) -> None:
        super().__init__(message)
        self.name, self.registered = name, list(registered or [])


class UsageError(ASRError):
    """A command line that argparse refused (raised instead of exiting, so ``main()`` can report it)."""

    def __init__(self, prog: str, usage: str, message: str) -> None:
        super().__init__(message)
        self.prog, self.usage = prog, usage


class FactoryError(CheckpointError):
    """A model factory (``"package.module:function"``) could not be imported, called, or did not build a module.

    ``factory`` is the spec; ``keyword`` the keyword argument it refused and ``suggestion`` that
    keyword's nearest match among ``accepted`` (when the problem is a keyword)."""

    def __init__(self, message: str, *, factory: str, keyword: str | None = None, suggestion: str | None = None,
                 accepted: list[str] | None = None) -> None:
        super().__init__(message)
        self.factory, self.keyword, self.suggestion = factory, keyword, suggestion
        self.accepted = list(accepted or [])


class InputShapeError(ASRError):
    """The model does not run on an input of ``shape`` (or no input shape is known: ``shape`` is None)."""

    def __init__(self, message: str, *, shape: list[int] | None = None) -> None:
        super().__init__(message)
        self.shape = shape


class OutputPathError(ASRError, OSError):
    """An output cannot be written at ``path`` (its folder is missing or read-only, it is a folder, a
    wrong suffix); also an ``OSError`` so callers that catch those keep working."""

    def __init__(self, message: str, *, path: str) -> None:
        ASRError.__init__(self, message)
        self.path = path

    def __str__(self) -> str:  # OSError's __str__ would print the errno form
        return self.args[0] if self.args else ""


class UnsupportedModelError(ASRError):
    """The model is in a form asr-fx cannot handle here, e.g. on the meta device (no weights) or in
    a dtype onnxruntime cannot check, or with attention values that are not finite; ``reason`` is a short key
    (``"meta"``, ``"dtype"``, ``"non-finite"``)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DifferentModelError(VerificationError):
    """The ONNX file is not the reference model at all (parameter count, op multiset or input shape differ)."""


class VanillaModelError(ASRError):
    """``fuse(..., into=vanilla)`` cannot write the fused weights into ``vanilla``: a fold it has no
    place for (the site is named), another architecture, or the filled model computes otherwise."""


class MissingDependencyError(ASRError, ImportError):
    """An optional dependency a requested feature needs is not installed (``package``); the message
    names the extra that installs it, e.g. ``pip install "asr-fx[openvino]"`` for ``--runtime openvino``."""

    def __init__(self, message: str, *, package: str) -> None:
        super().__init__(message)
        self.package = package
        self.name = package


class EquivalenceError(ASRError):
    """``instrument``/``fuse`` produced a model that does not compute what the model it was given computes
    on the probe input (checked before returning; ``check=False`` turns the check off)."""


class StateDictMismatchError(CheckpointError):
    """A state_dict does not fit the model: ``missing`` and ``unexpected`` keys, ``mismatched`` shapes
    (``key: checkpoint [...] vs model [...]``). ``asr_keys``: the state_dict was instrumented (``asr.*``
    keys) and the model rebuilt from the ASR options; ``attention``: the registered attention network
    the ``asr.*`` keys look like, when it is not the one the model was built with."""

    def __init__(self, message: str, *, missing: list[str], unexpected: list[str], mismatched: list[str],
                 asr_keys: bool = False, attention: str | None = None, path: str | None = None) -> None:
        super().__init__(message, path=path, reason="keys")
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        self.asr_keys, self.attention = asr_keys, attention


class UnknownSiteError(ASRError, KeyError):
    """A site asked for by name that is not there: a site node missing from the graph, a stripe site
    not measured, statistics of another model (also a ``KeyError``, as before)."""

    def __str__(self) -> str:  # KeyError's __str__ would quote the message
        return str(self.args[0]) if self.args else ""


class UnfoldableSiteError(ASRError):
    """Sites chosen for ASR whose scale could not fold into a layer after training (``sites``: each with
    its reason); leave them out with ``exclude=``."""

    def __init__(self, message: str, *, sites: list[str]) -> None:
        super().__init__(message)
        self.sites = list(sites)


class OnnxFileError(ASRError):
    """An ONNX file that cannot be read, has no inputs, or that the runtime (onnxruntime or OpenVINO,
    ``runtime``) cannot load or run; ``path`` is the file when known."""

    def __init__(self, message: str, *, path: str | None = None, runtime: str | None = None) -> None:
        super().__init__(message)
        self.path, self.runtime = path, runtime


class AttentionNetworkError(ASRError, TypeError):
    """An attention network that does not fit ASR: built without the ``psi_shape`` it must declare
    (also a ``TypeError``, as before)."""


class DetachedBlockError(ASRError):
    """A module-form model whose ASR block lost its place after ``instrument``: its module was removed or
    replaced (a library's own ``fuse()`` folding a BatchNorm into its conv, a swapped layer), so the model
    would compute without that block. ``sites`` are the module paths."""

    def __init__(self, message: str, *, sites: list[str] | None = None) -> None:
        super().__init__(message)
        self.sites = list(sites or [])
