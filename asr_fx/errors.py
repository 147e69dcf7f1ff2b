"""Exceptions raised by asr-fx. Each message names the problem and the way out."""

from __future__ import annotations


class ASRError(Exception):
    """Base class of every error asr-fx raises on purpose."""


class TraceError(ASRError):
    """torch.fx could not trace the model."""


class NoSitesError(ASRError):
    """Placement found no site for ASR."""


class FusionError(ASRError):
    """``fuse(..., strict=True)`` left at least one site unfolded."""


class VerificationError(ASRError):
    """The exported model does not agree with the reference within tolerance."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class CheckpointError(ASRError):
    """A checkpoint could not be read or does not fit the model."""


class InvalidOptionError(ASRError, ValueError):
    """An option has a value asr-fx does not know (an unknown rule, delta < 1, ...)."""


class EquivalenceError(ASRError):
    """``instrument``/``fuse`` produced a model that does not compute what the model it was given computes
    on the probe input (checked before returning; ``check=False`` turns the check off)."""
