"""Random programs for fuzzing :func:`asr_fx.fuse`: a spec (plain data, printable) and its ``nn.Module``.

A spec is a dict: input layout, seed for the weights, the original model's mode, whether
``asr_fx.instrument`` is applied, and a list of ops that run one after the other on a current
tensor ``h`` (with earlier values kept for residual adds, concats and extra outputs). The same
generator drives hypothesis (``programs()``, which shrinks) and a seeded ``random.Random``
(``random_spec(seed)``, what ``tools/fuzz_fuse.py`` runs), so every failure has a reproducer::

    from fuzz_programs import random_spec, check_program
    check_program(random_spec(1234))        # or check_program(<the printed spec>)

``check_program`` runs one program through ``fuse`` and returns the failures found, each with a
category (:data:`CATEGORIES`) and a message.

Known bugs (issue 14) are features the generator leaves out while they are in
:data:`KNOWN_BUGS`; the default fuzz tests pass on current code only because of those exclusions.
When a bug is fixed, delete its entry here: the fuzzer then generates that feature again.
"""

from __future__ import annotations

import copy
import math
import operator
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import asr_fx

#: Features the generator leaves out because they hit an open bug of issue 14. Each entry names the
#: item. Remove an entry once its fix lands; the fuzzer then covers the feature again.
KNOWN_BUGS: dict[str, str] = {
    "inplace_after_scale": "issue 14 item 1: an in-place op on the result of a constant mul is redirected "
                           "into the mul's input once the mul is folded/pushed away",
    "inplace_on_input": "issue 14 item 1 (and fuzz finding F1): an in-place op on the model input is dropped "
                        "with the folded mul, and fuse(example_inputs=) writes into the caller's tensors",
    "imul_read_again": "issue 14 item 2: `*=` / `+=` are traced as out-of-place operator.mul/add, wrong "
                       "when the value is read again (a residual, an output, the model input)",
    "extreme_scale": "issue 14 item 3 and fuzz finding F2: a scale pushed into a following eval BN "
                     "(_fold_rules._scale_bn_in, float32): entries <= 1e-19 overflow var/s^2, entries >= 1e4 "
                     "lose var + eps to cancellation in (std/|s|)^2 - eps",
    "float64_scale": "issue 14 item 4: a float64 scale folded into a float32 layer changes the dtype or "
                     "makes a mixed-dtype GroupNorm/LayerNorm",
    "reshape_round_trip": "issue 14 item 5: a reshape round trip (flatten/unflatten, reshape, "
                          "channels-last transpose) then a per-channel mul, with example_inputs: "
                          "propagate.map_through passes _reshape_backward its shapes swapped (crash, or a "
                          "silently wrong fold when batch == channels)",
    "unmatched_spellings": "issue 14 item 6: torch.multiply, torch.mul(other=), Tensor.multiply and "
                           "Python-literal scales are neither folded nor reported",
}

CATEGORIES = ("equivalence", "unreported leftover", "crash", "input mutated", "dtype")

SPELLINGS = ("*", "r*", "operator.mul", "torch.mul", "Tensor.mul", "mul_", "*=",
             "torch.mul(other=)", "torch.multiply", "Tensor.multiply", "literal")
_UNMATCHED = ("torch.mul(other=)", "torch.multiply", "Tensor.multiply", "literal")
_INPLACE_SPELLINGS = ("mul_", "*=")
ACTIVATIONS = ("relu", "relu_inplace", "relu_", "leaky", "gelu", "silu", "sigmoid", "hardswish")
NORMS = ("bn", "gn", "in", "ln")
POOLS = ("max", "avg", "adaptive_max", "adaptive_avg")
ROUND_TRIPS = ("flatten_unflatten", "permute", "transpose_unflatten", "reshape")
_SPATIAL = {1: (6,), 2: (4, 4), 3: (3, 3, 3)}
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
    c, dim = state["channels"], state["dim"]
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
    _fix_known_bugs(spec["ops"], exclude)
    _float64_only_last(spec)
    if "reshape_round_trip" in exclude and any(op["op"] == "round_trip" and op["kind"] != "permute"
                                               for op in spec["ops"]):
        spec["example_inputs"] = False  # without shapes, fuse refuses to move a scale through a reshape
    if spec["head"] and ch.boolean(0.5):
        spec["head_scale"] = _draw_scale(ch, 5, exclude, "channels_last")
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


# ----------------------------------------------------------------------------------------------
# the module a spec describes


def _activation(kind: str) -> nn.Module | None:
    return {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "leaky": nn.LeakyReLU(0.1),
            "gelu": nn.GELU(), "silu": nn.SiLU(), "sigmoid": nn.Sigmoid(), "hardswish": nn.Hardswish()}.get(kind)


def _norm(op: dict, c: int, dim: int) -> nn.Module:
    affine = op["affine"]
    if op["kind"] == "bn":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1](c, affine=affine)
    if op["kind"] == "gn":
        return nn.GroupNorm(op["groups"], c, affine=affine)
    if op["kind"] == "in":
        return (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dim - 1](c, affine=affine)
    return nn.LayerNorm(list(_SPATIAL[dim]), elementwise_affine=affine)  # over the spatial dims


def _pool(kind: str, dim: int) -> nn.Module:
    if kind == "max":
        return (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[dim - 1](3, 1, 1)
    if kind == "avg":
        return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dim - 1](3, 1, 1, count_include_pad=False)
    cls = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d) if kind == "adaptive_max" else \
        (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
    return cls[dim - 1](_SPATIAL[dim])


def _conv(op: dict, c: int, dim: int) -> nn.Module:
    k = op["k"]
    if op["transpose"]:
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dim - 1]
    else:
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
    return cls(c, op["out"], k, 1, k // 2, groups=op["groups"], bias=op["bias"])


class Program(nn.Module):
    """The module a spec describes; ``forward(x)`` returns a tensor or a tuple of tensors."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = copy.deepcopy(spec)
        torch.manual_seed(spec["seed"])
        dim, c = spec["dim"], spec["in_channels"]
        self.layers = nn.ModuleDict()
        saved: list[int] = []
        for i, op in enumerate(spec["ops"]):
            key, kind = str(i), op["op"]
            if kind == "conv":
                self.layers[key] = _conv(op, c, dim)
                c = op["out"]
            elif kind == "norm":
                self.layers[key] = _norm(op, c, dim)
            elif kind == "act" and _activation(op["kind"]) is not None:
                self.layers[key] = _activation(op["kind"])
            elif kind == "pool":
                self.layers[key] = _pool(op["kind"], dim)
            elif kind == "scale":
                self._add_scale(key, op, c, dim)
            elif kind == "round_trip" and "scale" in op:
                self._add_scale(key, op["scale"], c, dim)
            elif kind == "concat":
                c += saved[op["from"]]
            elif kind == "save":
                saved.append(c)
            elif kind == "channels_last":
                if op["layer"] == "ln":
                    self.layers[key] = nn.LayerNorm(c)
                elif op["layer"] == "linear":
                    self.layers[key] = nn.Linear(c, op["out"])
                    c = op["out"]
                if "scale" in op:
                    self._add_scale(key + "s", op["scale"], c, dim)
        if spec.get("head"):
            self.pool = nn.AdaptiveAvgPool1d(1) if dim == 1 else (nn.AdaptiveAvgPool2d(1) if dim == 2
                                                                   else nn.AdaptiveAvgPool3d(1))
            self.fc = nn.Linear(c, 5)
            if "head_scale" in spec:
                self._add_scale("head", spec["head_scale"], 5, 1)
        self._randomize()

    def _add_scale(self, key: str, sc: dict, c: int, dim: int) -> None:
        dtype = getattr(torch, sc["dtype"])
        values = torch.tensor(sc["values"], dtype=dtype)
        if sc["per_channel"]:
            if sc["layout"] == "channels_first":
                values = values.reshape(1, -1, *([1] * dim))
        else:
            values = values.reshape(())
        if sc["storage"] == "literal":
            return
        name = f"scale_{key}"
        if sc["storage"] == "parameter":
            self.register_parameter(name, nn.Parameter(values))
        elif sc["storage"] == "buffer":
            self.register_buffer(name, values)
        else:  # hand-written ASR: v = values * sigmoid(psi) / sigmoid(psi); psi -> tiny attention net
            self.register_parameter(f"psi_{key}", nn.Parameter(torch.full(values.shape, 0.3, dtype=dtype)))
            self.register_buffer(name, values)

    def _scale_value(self, key: str, sc: dict) -> Any:
        if sc["storage"] == "literal":
            return sc["values"][0]
        value = getattr(self, f"scale_{key}")
        if sc["storage"] == "psi":
            gate = torch.sigmoid(getattr(self, f"psi_{key}"))
            value = value * gate / gate  # a value computed from parameters, constant-folded by fuse
        return value

    def _randomize(self) -> None:
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                                  nn.modules.instancenorm._InstanceNorm)) and getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)

    @staticmethod
    def _multiply(h: torch.Tensor, c: Any, spelling: str) -> torch.Tensor:
        if spelling in ("*", "literal"):
            return h * c
        if spelling == "r*":
            return c * h
        if spelling == "operator.mul":
            return operator.mul(h, c)
        if spelling == "torch.mul":
            return torch.mul(h, c)
        if spelling == "torch.mul(other=)":
            return torch.mul(h, other=c)
        if spelling == "torch.multiply":
            return torch.multiply(h, c)
        if spelling == "Tensor.mul":
            return h.mul(c)
        if spelling == "Tensor.multiply":
            return h.multiply(c)
        if spelling == "mul_":
            return h.mul_(c)
        if spelling == "*=":
            h *= c
            return h
        raise AssertionError(spelling)

    def forward(self, x: torch.Tensor) -> Any:
        spec, dim = self.spec, self.spec["dim"]
        h = x
        saved: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        for i, op in enumerate(spec["ops"]):
            key, kind = str(i), op["op"]
            if kind in ("conv", "norm", "pool"):
                h = self.layers[key](h)
            elif kind == "act":
                h = h.relu_() if op["kind"] == "relu_" else self.layers[key](h)
            elif kind == "reuse":
                h = self.layers[str(op["conv"])](h)
            elif kind == "scale":
                h = self._multiply(h, self._scale_value(key, op), op["spelling"])
            elif kind == "round_trip":
                h = self._round_trip(h, op, key, dim)
            elif kind == "residual":
                h = h + saved[op["from"]]
            elif kind == "inplace_add":
                if op["spelling"] == "+=":
                    h += saved[op["from"]]
                else:
                    h = h.add_(saved[op["from"]])
            elif kind == "concat":
                h = torch.cat([h, saved[op["from"]]], 1)
            elif kind == "save":
                saved.append(h)
            elif kind == "output":
                outputs.append(h)
            elif kind == "channels_last":
                h = h.movedim(1, -1)
                if op["layer"] != "none":
                    h = self.layers[key](h)
                if "scale" in op:
                    h = self._multiply(h, self._scale_value(key + "s", op["scale"]), op["scale"]["spelling"])
                h = h.movedim(-1, 1)
        if spec.get("head"):
            h = self.fc(self.pool(h).flatten(1))
            if "head_scale" in spec:
                h = self._multiply(h, self._scale_value("head", spec["head_scale"]), spec["head_scale"]["spelling"])
        return (h, *outputs) if outputs else h

    def _round_trip(self, h: torch.Tensor, op: dict, key: str, dim: int) -> torch.Tensor:
        spatial = _SPATIAL[dim]
        if op["kind"] == "flatten_unflatten":
            return h.flatten(2).unflatten(2, spatial)
        if op["kind"] == "permute":
            order = (0, *range(2, dim + 2), 1)
            back = (0, dim + 1, *range(1, dim + 1))
            return h.permute(*order).contiguous().permute(*back)
        if op["kind"] == "reshape":
            return h.reshape(h.shape[0], h.shape[1], -1).reshape(h.shape)
        t = h.flatten(2).transpose(1, 2)  # (B, HW, C): channels last
        if "scale" in op:
            t = self._multiply(t, self._scale_value(key, op["scale"]), op["scale"]["spelling"])
        return t.transpose(1, 2).unflatten(2, spatial)


def example_input(spec: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    return torch.randn(spec["batch"], spec["in_channels"], *_SPATIAL[spec["dim"]], generator=g)


def build(spec: dict) -> nn.Module:
    """The model under test: the program, instrumented with ASR blocks when the spec says so, in the
    spec's mode. Raises ``asr_fx.ASRError`` when instrument refuses (callers fall back)."""
    model = Program(spec)
    if spec.get("instrument"):
        model = asr_fx.instrument(model, example_inputs=(example_input(spec),))
        g = torch.Generator().manual_seed(spec["seed"] + 2)
        with torch.no_grad():
            for p in asr_fx.asr_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.train(spec["train_mode"])
    return model


# ----------------------------------------------------------------------------------------------
# the checks


@dataclass
class Failure:
    category: str
    message: str


def _tensors(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _is_constant(node: Any, memo: dict) -> bool:
    """Whether a node's value depends on no placeholder (a get_attr or a computation on them)."""
    if not isinstance(node, fx.Node):
        return True
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = True
        elif node.op in ("placeholder", "output"):
            memo[node] = False
        else:
            memo[node] = all(_is_constant(n, memo) for n in node.all_input_nodes)
    return memo[node]


_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul, torch.multiply)
_MUL_METHODS = ("mul", "mul_", "multiply", "multiply_")


def constant_muls(gm: fx.GraphModule) -> list[fx.Node]:
    """Every multiply (any spelling) in ``gm`` of a graph value by a constant: a get_attr, a value
    computed from get_attrs only, or a Python number."""
    memo: dict = {}
    found = []
    for node in gm.graph.nodes:
        is_mul = (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or \
                 (node.op == "call_method" and node.target in _MUL_METHODS)
        if not is_mul:
            continue
        operands = [*node.args, *node.kwargs.values()]
        if len(operands) != 2:
            continue
        a, b = operands
        for x, c in ((a, b), (b, a)):
            if isinstance(x, fx.Node) and not _is_constant(x, memo) and \
                    (isinstance(c, (int, float)) or (isinstance(c, fx.Node) and _is_constant(c, memo))):
                found.append(node)
                break
    return found


def _snapshot(model: nn.Module) -> tuple:
    state = {k: (v.dtype, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    modes = [(n, type(m).__name__, m.training) for n, m in model.named_modules()]
    code = [getattr(m, "code", None) for m in model.modules() if isinstance(m, fx.GraphModule)]
    return state, modes, code


def _changed(before: tuple, model: nn.Module) -> str | None:
    state, modes, code = _snapshot(model)
    if state.keys() != before[0].keys():
        return f"state_dict keys changed: {sorted(set(state) ^ set(before[0]))}"
    for k, (dtype, value) in before[0].items():
        if state[k][0] != dtype or not torch.equal(state[k][1], value):
            return f"state_dict entry {k!r} changed"
    if modes != before[1]:
        return "module tree or training flags changed"
    if code != before[2]:
        return "GraphModule code changed"
    return None


def _run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs, then the input as the model left it (an in-place op may write into it)."""
    x = x.clone()
    with torch.no_grad():
        return [t.clone() for t in _tensors(model(x))] + [x]


def check_program(spec: dict, rtol: float = 1e-5) -> tuple[list[Failure], str]:
    """Run one program through ``fuse``; returns ``(failures, outcome)`` where ``outcome`` is
    ``"fused"``, ``"refused: <error>"`` (an ``asr_fx.ASRError``: a legitimate refusal) or
    ``"skipped: <why>"``."""
    failures: list[Failure] = []
    try:
        model = build(spec)
    except asr_fx.ASRError:
        spec = {**spec, "instrument": False}
        model = build(spec)
    x = example_input(spec)
    x_before = x.clone()
    before = _snapshot(model)
    mode = model.training
    kwargs = {"example_inputs": (x,)} if spec.get("example_inputs") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = asr_fx.fuse(model, **kwargs)
    except asr_fx.ASRError as exc:
        return failures, f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    except Exception as exc:  # noqa: BLE001 -- any other exception is the finding
        return [Failure("crash", f"fuse raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")], "crash"
    if not torch.equal(x, x_before):
        failures.append(Failure("input mutated", "fuse changed the example input tensor it was given"))
    changed = _changed(before, model)
    if changed or model.training != mode:
        failures.append(Failure("input mutated", changed or "fuse changed model.training"))

    # reference: the original model, eval mode, fp32 and a float64 copy
    model.eval()
    try:
        ref32 = _run(model, x)
        ref64 = _run(copy.deepcopy(model).double(), x.double())
    finally:
        model.train(mode)
    try:
        out = _run(fused, x)
    except Exception as exc:  # noqa: BLE001
        return failures + [Failure("crash", f"fused model raised {type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0][:200]}")], "crash"
    if len(out) != len(ref32):
        failures.append(Failure("equivalence", f"{len(out)} outputs instead of {len(ref32)}"))
        return failures, "fused"
    for i, (o, r32, r64) in enumerate(zip(out, ref32, ref64)):
        what = f"output {i}" if i < len(out) - 1 else "the input tensor after the call"
        if o.dtype != r32.dtype:
            failures.append(Failure("dtype", f"{what} is {o.dtype}, the original's is {r32.dtype}"))
        if o.shape != r32.shape:
            failures.append(Failure("equivalence", f"{what} has shape {tuple(o.shape)}, not {tuple(r32.shape)}"))
            continue
        scale = r64.abs().max().item() if r64.numel() else 0.0
        own = (r32.double() - r64).abs().max().item() if r64.numel() else 0.0  # fp32 error of the original
        err = (o.double() - r64).abs().max().item() if r64.numel() else 0.0
        if not math.isfinite(err) and not math.isfinite(own):
            continue
        if not (err <= rtol * scale + 4 * own + 1e-30):
            failures.append(Failure("equivalence", f"{what}: max|fused-ref64| = {err:.3g}, max|ref64| = "
                                                   f"{scale:.3g}, original's own fp32 error {own:.3g}"))
    report = asr_fx.fusion_report(fused)
    reported = {r.mul for r in report.records if not r.folded} if report else set()
    folded = {r.mul for r in report.records if r.folded} if report else set()
    for node in constant_muls(fused):
        if node.name not in reported:
            failures.append(Failure("unreported leftover", f"`{node.format_node()}` is left in the fused graph "
                                                           "and not in fusion_report as left as Mul"))
    names = {n.name for n in fused.graph.nodes}
    for name in sorted(folded & names):
        failures.append(Failure("unreported leftover", f"fusion_report says `{name}` folded, but it is still in "
                                                       "the graph"))
    return failures, "fused"


def reproducer(spec: dict) -> str:
    """Python that reruns one program."""
    return f"from fuzz_programs import check_program; print(check_program({spec!r}))"


__all__ = ["CATEGORIES", "KNOWN_BUGS", "Failure", "Program", "build", "check_program", "constant_muls",
           "example_input", "programs", "random_spec", "reproducer"]
