"""The module a fuzz program spec describes (see :mod:`fuzz_programs` for the spec)."""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable

import torch
from torch import nn

import asr_fx
from asr_fx.instrument_model import instrument_graph_form

SPATIAL = {1: (6,), 2: (4, 4), 3: (3, 3, 3)}


def _activation(kind: str) -> nn.Module | None:
    return {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "leaky": nn.LeakyReLU(0.1),
            "gelu": nn.GELU(), "silu": nn.SiLU(), "sigmoid": nn.Sigmoid(), "hardswish": nn.Hardswish()}.get(kind)


class SwishFunction(torch.autograd.Function):
    """A memory-efficient swish written as an autograd Function (its own backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class ReverseGradient(torch.autograd.Function):
    """The identity forward, the negated gradient backward (domain-adversarial training)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return -grad


FUNCTIONS = {"swish": SwishFunction, "reverse": ReverseGradient}


class Observer(nn.Module):
    """A step that the program's forward hooks on its first call (as transformers' output capture does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def observe(module: nn.Module, _args: Any, out: torch.Tensor) -> None:
    """A forward hook that only looks (records the output's rank on the module)."""
    module.seen_rank = out.dim()  # type: ignore[assignment]  # nn.Module types unknown attributes as tensors


def spelled_activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "swish":
        return h * torch.sigmoid(h)
    return h * torch.nn.functional.relu6(h + 3) / 6


def _norm(op: dict, c: int, dim: int) -> nn.Module:
    affine = op["affine"]
    if op["kind"] == "bn":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1](c, affine=affine)
    if op["kind"] == "gn":
        return nn.GroupNorm(op["groups"], c, affine=affine)
    if op["kind"] == "in":
        return (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dim - 1](c, affine=affine)
    return nn.LayerNorm(list(SPATIAL[dim]), elementwise_affine=affine)  # over the spatial dims


def _pool(kind: str, dim: int) -> nn.Module:
    if kind == "max":
        return (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[dim - 1](3, 1, 1)
    if kind == "avg":
        return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dim - 1](3, 1, 1, count_include_pad=False)
    cls = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d) if kind == "adaptive_max" else \
        (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
    return cls[dim - 1](SPATIAL[dim])


def _conv(op: dict, c: int, dim: int) -> nn.Module:
    k = op["k"]
    cls: type[nn.Module]
    if op["transpose"]:
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dim - 1]
    else:
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
    return cls(c, op["out"], k, 1, k // 2, groups=op["groups"], bias=op["bias"])


def multiply(h: torch.Tensor, c: Any, spelling: str) -> torch.Tensor:
    """``h`` times ``c``, spelled as ``spelling`` says (one of ``fuzz_programs.SPELLINGS``)."""
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


def _shift_output(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
    return out + 0.25


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
            elif kind == "inplace_chain":  # h.sub_(m).div_(s) / h.mul_(a).add_(1): the chain's result unused
                self.register_buffer(f"chain_a_{key}", torch.linspace(-0.5, 0.5, c).reshape(1, -1, *([1] * dim)))
                self.register_buffer(f"chain_b_{key}", torch.linspace(0.5, 1.5, c).reshape(1, -1, *([1] * dim)))
            elif kind == "identity_alias":  # o = h; drop(h).mul_(s); h = o: Dropout/Identity return h itself
                self.layers[key] = nn.Dropout(0.3) if op["module"] == "dropout" else nn.Identity()
                self._add_scale(key, op["scale"], c, dim)
            elif kind == "norm":
                self.layers[key] = _norm(op, c, dim)
            elif kind == "act" and (activation := _activation(op["kind"])) is not None:
                self.layers[key] = activation
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
            elif kind == "hook":
                self.layers[key] = Observer()
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
        for i, op in enumerate(spec["ops"]):
            if op["op"] == "conv":
                self._wrap_conv(str(i), op)
        self._randomize()
        if spec.get("dtype", "float32") != "float32":
            self.to(getattr(torch, spec["dtype"]))

    def _wrap_conv(self, key: str, op: dict) -> None:
        """A forward hook or a weight parametrization on a conv (a layer whose output is not its weights')."""
        conv = self.layers[key]
        if op.get("hook"):
            conv.register_forward_hook(_shift_output)
        if op.get("param") == "weight_norm":
            nn.utils.parametrizations.weight_norm(conv)
        elif op.get("param") == "spectral_norm":
            nn.utils.parametrizations.spectral_norm(conv)

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
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None \
                        and m.running_var is not None:
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                                  nn.modules.instancenorm._InstanceNorm)) and getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)


    def forward(self, x: torch.Tensor) -> Any:
        spec, dim = self.spec, self.spec["dim"]
        h = x
        saved: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        for i, op in enumerate(spec["ops"]):
            key, kind = str(i), op["op"]
            if kind in ("conv", "norm", "pool"):
                h = self.layers[key](h)
            elif kind == "inplace_chain":
                a, b = getattr(self, f"chain_a_{key}"), getattr(self, f"chain_b_{key}")
                if op["kind"] == "sub_div":
                    h.sub_(a).div_(b)
                else:
                    h.mul_(b).add_(1.0)
            elif kind == "identity_alias":
                kept = h
                self.layers[key](h).mul_(self._scale_value(key, op["scale"]))
                h = kept
            elif kind == "act":
                h = h.relu_() if op["kind"] == "relu_" else self.layers[key](h)
            elif kind == "reuse":
                h = self.layers[str(op["conv"])](h)
            elif kind == "scale":
                h = multiply(h, self._scale_value(key, op), op["spelling"])
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
            elif kind == "function":
                h = FUNCTIONS[op["kind"]].apply(h)
            elif kind == "spelled_act":
                h = spelled_activation(h, op["kind"])
            elif kind == "hook":
                if not getattr(self, f"_hooked_{key}", False):  # once, behind a flag
                    self.layers[key].register_forward_hook(observe)
                    setattr(self, f"_hooked_{key}", True)
                h = self.layers[key](h)
            elif kind == "output":
                outputs.append(h)
            elif kind == "channels_last":
                h = h.movedim(1, -1)
                if op["layer"] != "none":
                    h = self.layers[key](h)
                if "scale" in op:
                    h = multiply(h, self._scale_value(key + "s", op["scale"]), op["scale"]["spelling"])
                h = h.movedim(-1, 1)
        if spec.get("head"):
            h = self.fc(self.pool(h).flatten(1))
            if "head_scale" in spec:
                h = multiply(h, self._scale_value("head", spec["head_scale"]), spec["head_scale"]["spelling"])
        return (h, *outputs) if outputs else h

    def _round_trip(self, h: torch.Tensor, op: dict, key: str, dim: int) -> torch.Tensor:
        spatial = SPATIAL[dim]
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
            t = multiply(t, self._scale_value(key, op["scale"]), op["scale"]["spelling"])
        return t.transpose(1, 2).unflatten(2, spatial)


def example_input(spec: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    x = torch.randn(spec["batch"], spec["in_channels"], *SPATIAL[spec["dim"]], generator=g)
    return x.to(getattr(torch, spec.get("dtype", "float32")))


def instrument_for(spec: dict) -> Callable[..., nn.Module]:
    """The instrument the spec asks for: the graph form with ``"graph_form": True``, else the module form."""
    return instrument_graph_form if spec.get("graph_form") else asr_fx.instrument


def build(spec: dict) -> nn.Module:
    """The model under test: the program, instrumented with ASR blocks when the spec says so, in the
    spec's mode. Raises ``asr_fx.ASRError`` when instrument refuses (callers fall back). ``"graph_form":
    True`` in the spec: instrument's graph form (:func:`asr_fx.instrument_graph_form`, a GraphModule of the
    captured graph), for checks about the capture itself; else :func:`asr_fx.instrument` (the user's class)."""
    model: nn.Module = Program(spec)
    if spec.get("instrument"):
        model = instrument_for(spec)(model, example_inputs=(example_input(spec),))
        g = torch.Generator().manual_seed(spec["seed"] + 2)
        with torch.no_grad():
            for p in asr_fx.asr_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.train(spec["train_mode"])
    return model


__all__ = ["FUNCTIONS", "SPATIAL", "Observer", "Program", "build", "example_input", "multiply", "observe"]
