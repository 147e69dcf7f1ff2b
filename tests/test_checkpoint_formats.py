"""Issue 6: every checkpoint format the CLI takes becomes a verified ONNX file; safe loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import ORT_RTOL, perturb_asr
from torch import nn

import asr_fx
from asr_fx.errors import CheckpointError
from asr_fx.foreign_checkpoints import load_checkpoint
from asr_fx.state_dicts import asr_layout, normalize_keys

FACTORY = "asr_fx.models:cifar_resnet"
SMALL = {"depth": 11, "num_classes": 10}
SHAPE = (1, 3, 32, 32)
MODEL_ARGS = ["--model", FACTORY, "--factory-args", json.dumps(SMALL), "--input-shape", "1,3,32,32"]


class _Wrapper(nn.Module):
    """Holds the network under one attribute, as DDP (``module``) or a LightningModule (``model``) does."""

    def __init__(self, attribute: str, net: nn.Module) -> None:
        super().__init__()
        self.add_module(attribute, net)


def _trained() -> nn.Module:
    torch.manual_seed(0)
    vanilla = asr_fx.build(FACTORY, **SMALL)
    model = asr_fx.instrument(vanilla, example_inputs=(torch.zeros(SHAPE),))
    perturb_asr(model)
    return model.eval()


def _write_formats(model: nn.Module, folder) -> dict[str, tuple[str, list[str]]]:
    """Each format: (file, extra CLI arguments)."""
    sd = model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()
    files = {
        "asr-fx": ("asrfx.pt", []),
        "bare state_dict": ("bare.pt", MODEL_ARGS),
        "ddp {'model'} module.": ("ddp.pt", MODEL_ARGS),
        "lightning {'state_dict'} model.": ("lightning.pt", MODEL_ARGS),
        "torch.compile _orig_mod.": ("compiled.pt", MODEL_ARGS),
        "compiled ddp module._orig_mod.": ("ddp_compiled.pt", MODEL_ARGS),
        "pickled module": ("pickled.pt", ["--trust-checkpoint"]),
    }
    path = {name: os.path.join(folder, f) for name, (f, _) in files.items()}
    asr_fx.save(model, path["asr-fx"])
    torch.save(sd, path["bare state_dict"])
    torch.save({"model": _Wrapper("module", model).state_dict(), "optimizer": optimizer, "epoch": 3},
               path["ddp {'model'} module."])
    torch.save({"state_dict": {**_Wrapper("model", model).state_dict(), "loss_fn.weight": torch.ones(10)},
                "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                "optimizer_states": [optimizer], "hyper_parameters": {"lr": 0.1}}, path["lightning {'state_dict'} "
                                                                                        "model."])
    torch.save(torch.compile(model).state_dict(), path["torch.compile _orig_mod."])
    torch.save(_Wrapper("module", torch.compile(model)).state_dict(), path["compiled ddp module._orig_mod."])
    torch.save(model, path["pickled module"])
    return {name: (path[name], args) for name, (_, args) in files.items()}


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    model = _trained()
    return model, folder, _write_formats(model, str(folder))


@pytest.fixture(scope="module")
def cli_runs(formats):
    """One subprocess runs ``asr-fx fuse`` (its ``main``) on every format; torch starts once."""
    _, folder, written = formats
    runs = {name: ["fuse", path, "-o", os.path.join(folder, f"{i}.onnx"), "--json", *args]
            for i, (name, (path, args)) in enumerate(written.items())}
    script = (
        "import contextlib, io, json, sys\n"
        "from asr_fx.cli import main\n"
        "results = {}\n"
        "for name, argv in json.loads(sys.argv[1]).items():\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        code = main(argv)\n"
        "    results[name] = {'code': code, 'report': json.loads(out.getvalue())}\n"
        "print(json.dumps(results))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["asr-fx", "bare state_dict", "ddp {'model'} module.", "lightning {'state_dict'} "
                                                                                        "model.",
                                  "torch.compile _orig_mod.", "compiled ddp module._orig_mod.", "pickled module"])
def test_each_format_gives_a_verified_onnx_file(name, formats, cli_runs):
    model, folder, _ = formats
    runs, results = cli_runs
    result = results[name]
    assert result["code"] == 0, result
    report = result["report"]
    assert report["ok"] and report["verified"] and all(o["ok"] for o in report["outputs"])
    assert report["fusion"]["folded"] == 3 and report["fusion"]["unfolded"] == 0
    out = runs[name][runs[name].index("-o") + 1]
    # independently of the CLI: onnxruntime on the file agrees with the model as trained
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(actual - expected).max() <= ORT_RTOL * np.abs(expected).max()
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_formats_are_named_in_the_report(cli_runs):
    _, results = cli_runs
    formats = {name: r["report"]["checkpoint"]["format"] for name, r in results.items()}
    assert formats["asr-fx"] == "asr-fx"
    assert formats["bare state_dict"] == "bare state_dict"
    assert formats["ddp {'model'} module."] == "training checkpoint ['model']"
    assert formats["lightning {'state_dict'} model."] == "training checkpoint ['state_dict']"
    assert formats["pickled module"] == "pickled module"
    notes = results["lightning {'state_dict'} model."]["report"]["checkpoint"]["notes"]
    assert "stripped the prefix 'model.', ignored 1 key(s) outside it" in notes


@pytest.mark.parametrize("name", ["bare state_dict", "ddp {'model'} module.", "lightning {'state_dict'} model.",
                                  "torch.compile _orig_mod.", "compiled ddp module._orig_mod."])
def test_state_dict_formats_load_to_the_same_model(name, formats):
    model, _, written = formats
    path, _ = written[name]
    loaded = load_checkpoint(path, factory=FACTORY, factory_kwargs=SMALL)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert sum(p.numel() for p in loaded.vanilla.parameters()) == sum(
        p.numel() for p in asr_fx.build(FACTORY, **SMALL).parameters())


def test_pickled_module_is_refused_without_trust_and_loads_with_it(formats):
    model, _, written = formats
    path, _ = written["pickled module"]
    with pytest.raises(CheckpointError, match="trust=True") as info:  # the CLI says --trust-checkpoint (test_cli)
        load_checkpoint(path)
    assert "pickled Python objects" in str(info.value) and "arbitrary code" in str(info.value)
    assert info.value.reason == "pickled"
    loaded = load_checkpoint(path, trust=True)
    x = torch.randn(1, *SHAPE[1:])
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.vanilla is not None  # the factory recorded by asr_fx.build rebuilds it
    assert loaded.input_shape == list(SHAPE)


def test_normalize_keys_strips_wrapper_prefixes_in_any_nesting():
    expected = ["conv.weight", "fc.bias"]
    t = torch.zeros(1)
    for keys in (["module._orig_mod.conv.weight", "module._orig_mod.fc.bias"],
                 ["_orig_mod.module.conv.weight", "_orig_mod.module.fc.bias"],
                 ["model.module.conv.weight", "model.module.fc.bias", "ema.conv.weight"]):
        sd, notes = normalize_keys({k: t for k in keys}, expected)
        assert sorted(sd) == expected, (keys, notes)
    sd, notes = normalize_keys({"model.conv.weight": t}, ["model.conv.weight"])  # a real `model` submodule stays
    assert list(sd) == ["model.conv.weight"] and notes == []


def test_asr_layout_reads_sites_and_delta_from_keys():
    t = torch.zeros(1)
    assert asr_layout({"asr.a.psi": t, "asr.b.psi": t, "conv.weight": t}) == (["a", "b"], 1)
    assert asr_layout({"asr.a.0.psi": t, "asr.a.1.psi": t}) == (["a"], 2)
    assert asr_layout({"conv.weight": t}) == ([], 1)


def test_delta_2_state_dict_is_instrumented_again_from_its_keys(tmp_path):
    torch.manual_seed(0)
    model = asr_fx.instrument(asr_fx.build(FACTORY, **SMALL), delta=2).eval()
    perturb_asr(model)
    torch.save({"model": model.state_dict()}, tmp_path / "d2.pt")
    loaded = load_checkpoint(tmp_path / "d2.pt", factory=FACTORY, factory_kwargs=SMALL)
    x = torch.randn(1, *SHAPE[1:])
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
