"""Random programs for fuzzing :func:`asr_fx.fuse`: a spec (plain data, printable) and its ``nn.Module``.

A spec is a dict: input layout, seed for the weights, the original model's mode, whether
``asr_fx.instrument`` is applied, and a list of ops that run one after the other on a current
tensor ``h`` (with earlier values kept for residual adds, concats and extra outputs). The same
generator drives hypothesis (``programs()``, which shrinks) and a seeded ``random.Random``
(``random_spec(seed)``, what ``tools/fuzz_fuse.py`` runs), so every failure has a reproducer::

    from testkit.fuzz_programs import random_spec, check_program
    check_program(random_spec(1234))        # or check_program(<the printed spec>)

``check_program`` runs one program through ``fuse`` and returns the failures found, each with a
category (:data:`CATEGORIES`) and a message.

Known bugs (issue 14) are features the generator leaves out while they are in
:data:`KNOWN_BUGS`; the default fuzz tests pass on current code only because of those exclusions.
When a bug is fixed, delete its entry here: the fuzzer then generates that feature again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import strategies as st

from .fuzz_check import CATEGORIES, Failure, check_program, constant_muls, reproducer
from .fuzz_model import Program, build, example_input

#: Features the generator leaves out because they hit an open bug of issue 14. Each entry names the
#: item. Remove an entry once its fix lands; the fuzzer then covers the feature again.
KNOWN_BUGS: dict[str, str] = {}

SPELLINGS = ("*", "r*", "operator.mul", "torch.mul", "Tensor.mul", "mul_", "*=",
             "torch.mul(other=)", "torch.multiply", "Tensor.multiply", "literal")
_UNMATCHED = ("torch.mul(other=)", "torch.multiply", "Tensor.multiply", "literal")
_INPLACE_SPELLINGS = ("mul_", "*=")
ACTIVATIONS = ("relu", "relu_inplace", "relu_", "leaky", "gelu", "silu", "sigmoid", "hardswish")
NORMS = ("bn", "gn", "in", "ln")
POOLS = ("max", "avg", "adaptive_max", "adaptive_avg")
ROUND_TRIPS = ("flatten_unflatten", "permute", "transpose_unflatten", "reshape")
MAX_CHANNELS = 16


# ----------------------------------------------------------------------------------------------
# choices: the same generator under hypothesis (shrinkable) or a seeded random.Random


class _RandomChooser:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, items: Sequence[Any]) -> Any:
        return items[self.rng.randrange(len(items))]

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def boolean(self, p: float = 0.5) -> bool:
        return self.rng.random() < p


class _HypothesisChooser:
    def __init__(self, draw: Callable[[st.SearchStrategy], Any]) -> None:
        self.draw = draw

    def choice(self, items: Sequence[Any]) -> Any:
        return self.draw(st.sampled_from(list(items)))

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def boolean(self, p: float = 0.5) -> bool:
        # hypothesis shrinks booleans towards False: "False" is the plain program
        return self.draw(st.integers(0, 999)) < int(p * 1000)


def _scale_values(ch: Any, n: int, exclude: set[str]) -> list[float]:
    kinds = ["positive", "positive", "mixed", "zero", "negative", "ones"]
    if "extreme_scale" not in exclude:
        kinds += ["tiny", "huge"]
    kind = ch.choice(kinds)
    values = [round(0.5 + ch.integer(0, 100) / 100, 2) for _ in range(n)]
    if kind == "mixed":
        values = [v * ch.choice((1, -1)) for v in values]
    elif kind == "zero":
        values[ch.integer(0, n - 1)] = 0.0
    elif kind == "negative":
        values = [-v for v in values]
    elif kind == "ones":
        values = [1.0] * n
    elif kind == "tiny":
        values[ch.integer(0, n - 1)] = ch.choice((1e-20, 1e-30, -1e-20))
    elif kind == "huge":
        values[ch.integer(0, n - 1)] = ch.choice((1e4, 1e6, -1e5))
    return values


def _draw_scale(ch: Any, channels: int, exclude: set[str], layout: str) -> dict:
    """A constant for ``h * c``: per channel or one value, stored as a parameter/buffer, computed
    from a psi (hand-written ASR), or a Python literal."""
    spellings = [s for s in SPELLINGS if not (s in _UNMATCHED and "unmatched_spellings" in exclude)]
    spelling = ch.choice(spellings)
    per_channel = spelling != "literal" and ch.boolean(0.8)
    values = _scale_values(ch, channels if per_channel else 1, exclude)
    storage = "literal" if spelling == "literal" else ch.choice(("parameter", "buffer", "psi"))
    dtype = "float64" if storage != "literal" and "float64_scale" not in exclude and ch.boolean(0.15) else "float32"
    return {"spelling": spelling, "values": values, "per_channel": per_channel, "storage": storage,
            "dtype": dtype, "layout": layout}


def _draw_op(ch: Any, state: dict, exclude: set[str]) -> dict | None:
    c = state["channels"]
    kinds = ["conv", "conv", "norm", "act", "act", "pool", "scale", "scale", "scale", "round_trip", "residual",
             "concat", "reuse", "save", "output", "inplace_add", "channels_last"]
    kind = ch.choice(kinds)
    if kind == "conv":
        out = ch.integer(1, 8) if c * 2 > MAX_CHANNELS else ch.integer(1, 12)
        divisors = [g for g in range(1, min(c, out) + 1) if c % g == 0 and out % g == 0]
        return {"op": "conv", "out": out, "k": ch.choice((1, 3)), "groups": ch.choice(divisors),
                "transpose": ch.boolean(0.25), "bias": ch.boolean(0.7)}
    if kind == "norm":
        norm = ch.choice(NORMS)
        op = {"op": "norm", "kind": norm, "affine": ch.boolean(0.7)}
        if norm == "gn":
            op["groups"] = ch.choice([g for g in range(1, c + 1) if c % g == 0])
        return op
    if kind == "act":
        return {"op": "act", "kind": ch.choice(ACTIVATIONS)}
    if kind == "pool":
        return {"op": "pool", "kind": ch.choice(POOLS)}
    if kind == "scale":
        return {"op": "scale", **_draw_scale(ch, c, exclude, "channels_first")}
    if kind == "round_trip":
        trip = ch.choice(ROUND_TRIPS)
        op = {"op": "round_trip", "kind": trip}
        if trip == "transpose_unflatten" and ch.boolean(0.7):
            op["scale"] = _draw_scale(ch, c, exclude, "channels_last")
        return op
    if kind == "residual":
        same = [i for i, s in enumerate(state["saved"]) if s == c]
        return {"op": "residual", "from": ch.choice(same)} if same else None
    if kind == "concat":
        fits = [i for i, s in enumerate(state["saved"]) if s + c <= MAX_CHANNELS]
        return {"op": "concat", "from": ch.choice(fits)} if fits else None
    if kind == "reuse":
        convs = [i for i, (ci, co) in state["convs"].items() if ci == co == c]
        return {"op": "reuse", "conv": ch.choice(convs)} if convs else None
    if kind == "save":
        return {"op": "save"}
    if kind == "output":
        return {"op": "output"}
    if kind == "inplace_add":
        same = [i for i, s in enumerate(state["saved"]) if s == c]
        if not same:
            return None
        return {"op": "inplace_add", "from": ch.choice(same), "spelling": ch.choice(("+=", "add_"))}
    if kind == "channels_last":  # permute to (..., C), LayerNorm or Linear, optional scale, permute back
        op = {"op": "channels_last", "layer": ch.choice(("ln", "linear", "none")), "out": ch.integer(1, 12)}
        if ch.boolean(0.7):
            op["scale"] = _draw_scale(ch, op["out"] if op["layer"] == "linear" else c, exclude, "channels_last")
        return op
    raise AssertionError(kind)


def _inplace_spelling(op: dict) -> str | None:
    """How an op writes into the current value in place, if it does: ``"method"`` (``mul_``,
    ``add_``, ``relu_``, ``ReLU(inplace=True)``) or ``"augmented"`` (``*=``, ``+=``)."""
    kind = op["op"]
    if kind == "act" and op["kind"] in ("relu_inplace", "relu_"):
        return "method"
    if kind == "inplace_add":
        return "augmented" if op["spelling"] == "+=" else "method"
    if kind == "scale" and op["spelling"] in _INPLACE_SPELLINGS:
        return "augmented" if op["spelling"] == "*=" else "method"
    return None


def _out_of_place(op: dict) -> None:
    """Turn an in-place op into its out-of-place form (same value, no write)."""
    if op.get("op") == "act":
        op["kind"] = "relu"
    elif op.get("op") == "inplace_add":
        op["op"] = "residual"
        del op["spelling"]
    else:
        op["spelling"] = "*"


def _fix_known_bugs(ops: list[dict], exclude: set[str]) -> None:
    """Rewrite the in-place ops that hit a known bug (:data:`KNOWN_BUGS`) into out-of-place ones.

    An in-place write is safe from items 1/2 only on a *fresh* value: made by a layer, not the
    model input (or a view of it), not the result of a constant mul, not read by anything else
    (saved for a residual/concat, or a model output). ``owner`` says why the value is not fresh.
    """
    owner: str | None = "input"
    for op in ops:
        kind, how = op["op"], _inplace_spelling(op)
        inner = op.get("scale")
        if kind == "channels_last" and op["layer"] != "none":
            owner = None
        if inner is not None and inner["spelling"] in _INPLACE_SPELLINGS:
            how = "augmented" if inner["spelling"] == "*=" else "method"
        if how is not None and owner is not None:
            key = {"input": "inplace_on_input", "scale": "inplace_after_scale", "read": "imul_read_again"}[owner]
            if how == "augmented" and "imul_read_again" in exclude or key in exclude:
                _out_of_place(inner if inner is not None and inner["spelling"] in _INPLACE_SPELLINGS else op)
        if kind in ("save", "output"):
            owner = owner or "read"
        elif kind in ("conv", "norm", "pool", "residual", "concat", "reuse") or \
                (kind == "act" and how is None):
            owner = None
        if kind == "scale" or inner is not None:
            owner = owner if owner == "input" and kind == "scale" and how else "scale"


def _draw_spec(ch: Any, exclude: set[str], max_ops: int = 8) -> dict:
    dim = ch.choice((1, 2, 2, 2, 3))
    channels = ch.integer(1, 6)
    spec: dict[str, Any] = {
        "seed": ch.integer(0, 2**31 - 1), "dim": dim, "in_channels": channels, "batch": ch.choice((1, 2, 3)),
        "train_mode": ch.boolean(0.3), "instrument": ch.boolean(0.2), "example_inputs": ch.boolean(0.6),
        "head": ch.boolean(0.3), "ops": [],
    }
    state = {"channels": channels, "dim": dim, "saved": [], "convs": {}}
    for _ in range(ch.integer(1, max_ops)):
        op = _draw_op(ch, state, exclude)
        if op is None:
            continue
        _advance(state, op, len(spec["ops"]))
        spec["ops"].append(op)
    if spec["head"] and ch.boolean(0.5):
        spec["head_scale"] = _draw_scale(ch, 5, exclude, "channels_last")
    _fix_known_bugs(spec["ops"], exclude)
    _float64_only_last(spec)
    if "instrument_float64_param" in exclude and spec["instrument"]:
        for op in [*spec["ops"], {"op": "head", "scale": spec.get("head_scale")}]:
            sc = op.get("scale") or (op if op["op"] == "scale" else None)
            if sc is not None and sc["storage"] in ("parameter", "psi"):
                sc["dtype"] = "float32"
    if "reshape_round_trip" in exclude and any(op["op"] == "round_trip" and op["kind"] != "permute"
                                               for op in spec["ops"]):
        spec["example_inputs"] = False  # without shapes, fuse refuses to move a scale through a reshape
    return spec


def _float64_only_last(spec: dict) -> None:
    """A per-channel float64 constant promotes the value to float64; a later float32 layer would then
    fail in the original model too. Keep such constants on the last op of a head-less program."""
    last = len(spec["ops"]) - 1
    for i, op in enumerate(spec["ops"]):
        sc = op.get("scale") or (op if op["op"] == "scale" else None)
        if sc is not None and sc["dtype"] == "float64" and sc["per_channel"] and (i != last or spec["head"]):
            sc["dtype"] = "float32"


def _advance(state: dict, op: dict, index: int) -> None:
    c = state["channels"]
    kind = op["op"]
    if kind == "conv":
        state["convs"][index] = (c, op["out"])
        state["channels"] = op["out"]
    elif kind == "concat":
        state["channels"] = c + state["saved"][op["from"]]
    elif kind == "channels_last" and op["layer"] == "linear":
        state["channels"] = op["out"]
    elif kind == "save":
        state["saved"].append(c)


def random_spec(seed: int, exclude: set[str] | None = None, max_ops: int = 8) -> dict:
    """The program for ``seed`` (``exclude``: known-bug features to leave out; default: every key of
    :data:`KNOWN_BUGS`)."""
    return _draw_spec(_RandomChooser(random.Random(seed)), set(KNOWN_BUGS) if exclude is None else exclude, max_ops)


def programs(exclude: set[str] | None = None, max_ops: int = 8) -> st.SearchStrategy[dict]:
    """Hypothesis strategy of program specs."""
    exclude = set(KNOWN_BUGS) if exclude is None else exclude

    @st.composite
    def draw(d: Callable) -> dict:
        return _draw_spec(_HypothesisChooser(d), exclude, max_ops)

    return draw()


__all__ = ["CATEGORIES", "KNOWN_BUGS", "Failure", "Program", "build", "check_program", "constant_muls",
           "example_input", "programs", "random_spec", "reproducer"]
