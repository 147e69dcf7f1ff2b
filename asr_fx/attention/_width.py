"""The widths of the built-in attention networks: the paper's defaults, a floor on request, or a
width given outright (one number, or one per channel count, as a checkpoint records them).

``hidden_width(C, r)`` is ``round(C / r)``, the SE rule of Hu et al. that the ASR paper uses with
``r = 16`` (4, 8 and 16 hidden units at ``C = 64, 128, 256``). ``round`` is Python's (halves go
to the even number: ``round(40 / 16) = 2``). There is no floor by default; ``min_hidden`` sets one
(capped at ``C``), and below one unit the width is 1 (``C < r / 2`` would round to 0).

A width given per channel count, ``{64: 4, 128: 8}`` (keys may be strings, as JSON writes them),
is how :func:`asr_fx.instrument` records the widths it built, so a checkpoint rebuilds with the
shapes it was trained with whatever the defaults are later.
"""

from __future__ import annotations

from collections.abc import Mapping

from asr_fx.errors import InvalidOptionError

PerChannel = int | Mapping[int | str, int] | None


def per_channel(value: PerChannel, channels: int, name: str) -> int | None:
    """``value`` for a site of ``channels`` channels: the number itself, its entry in a mapping, or ``None``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        for key, width in value.items():
            if int(key) == channels:
                return int(width)
        raise InvalidOptionError(f"{name}={dict(value)!r} gives no width for a site of {channels} channels; "
                         f"add an entry {channels}: <width>, or leave {name} out for the default")
    return int(value)


def hidden_width(channels: int, reduction: float = 16, min_hidden: int = 1, hidden: PerChannel = None) -> int:
    """The hidden width of an SE-like bottleneck: ``hidden`` when given, else
    ``max(round(channels / reduction), min(min_hidden, channels), 1)``."""
    given = per_channel(hidden, channels, "hidden")
    if given is not None:
        if given < 1:
            raise InvalidOptionError(f"hidden must be >= 1, got {given} for {channels} channels")
        return given
    if reduction <= 0:
        raise InvalidOptionError(f"reduction must be > 0, got {reduction}")
    return max(round(channels / reduction), min(min_hidden, channels), 1)
