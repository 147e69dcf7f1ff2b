"""fuse(model, into=vanilla): the folded weights written into the user's own model, checked, or refused.

Each library test builds the vanilla model twice from its factory (random weights, no download):
one is instrumented and its ASR state moved off its init (as training would), the other is the
``into=`` target. The target must come back as the same object, computing what the instrumented
model computes (DESIGN.md: max abs error <= 1e-5 * max|ref| in torch, 1e-4 relative in onnxruntime).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import FUSE_RTOL, ORT_RTOL, SharedBN, n_params, perturb_asr, rel_err, train_step
from into_models import CheckedResidual, SmallResidual
from torch import nn

import asr_fx
import asr_fx.models
from asr_fx.errors import VanillaModelError
from asr_fx.into_vanilla import flat_outputs


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _trained(model: nn.Module, x: torch.Tensor, **kwargs) -> nn.Module:
    """Instrument, perturb the ASR state, one SGD step (moves weights and BN running stats), eval."""
    asr = asr_fx.instrument(model, example_inputs=(x,), **kwargs)
    perturb_asr(asr)
    train_step(asr, torch.cat([x, x.flip(0) + 0.1]))
    return asr.eval()


# ---------------------------------------------------------------- torchvision


def test_torchvision_resnet_into_is_the_vanilla_object():
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    asr = _trained(torchvision.models.resnet18(num_classes=10), x)
    vanilla = torchvision.models.resnet18(num_classes=10)
    before = _state(vanilla)
    out = asr_fx.fuse(asr, strict=True, into=vanilla, example_inputs=(x,))
    assert out is vanilla and type(out) is torchvision.models.ResNet and not out.training
    assert not _same_state(vanilla, before)
    with torch.no_grad():
        ref = asr(x)
        assert rel_err(ref, vanilla(x)) <= FUSE_RTOL
    assert n_params(vanilla) == sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    # running statistics came along (the SGD step moved them off 0/1)
    assert torch.equal(vanilla.layer1[0].bn1.running_mean, asr.get_submodule("layer1.0.bn1").running_mean)
    assert not torch.equal(vanilla.layer1[0].bn1.running_mean, torch.zeros(64))
    # the ordinary user path: the state_dict loads strictly into another freshly built model
    again = torchvision.models.resnet18(num_classes=10).eval()
    again.load_state_dict(vanilla.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(ref, again(x)) <= FUSE_RTOL


def test_probe_input_from_the_recorded_shape_or_the_first_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    asr = _trained(SmallResidual(), x)  # records input_shape [2, 3, 16, 16]
    vanilla = SmallResidual()
    assert asr_fx.fuse(asr, into=vanilla) is vanilla
    asr = asr_fx.instrument(SmallResidual())  # no shape recorded: (1, 3, 32, 32) from the first conv
    perturb_asr(asr)
    vanilla = SmallResidual()
    assert asr_fx.fuse(asr.eval(), into=vanilla) is vanilla
    with torch.no_grad():
        assert rel_err(asr(x), vanilla(x)) <= FUSE_RTOL


class Squeezed(nn.Module):
    """A stem whose first layer reads a reshaped input: no probe shape can be derived."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 12)
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        return self.norm(self.fc(x.flatten(1)))


def test_no_probe_input_asks_for_example_inputs():
    asr = asr_fx.instrument(Squeezed(), sites=["norm"])
    vanilla = Squeezed()
    with pytest.raises(VanillaModelError, match="example_inputs="):
        asr_fx.fuse(asr.eval(), into=vanilla)
    x = torch.randn(2, 3, 4)
    assert asr_fx.fuse(asr.eval(), into=vanilla, example_inputs=(x,)) is vanilla


# ---------------------------------------------------------------- refusals (vanilla left untouched)


def test_wrong_architecture_names_the_first_mismatches():
    import torchvision

    x = torch.randn(1, 3, 32, 32)
    asr = asr_fx.instrument(torchvision.models.resnet18(num_classes=10), example_inputs=(x,)).eval()
    vanilla = torchvision.models.resnet18(num_classes=5)
    before = _state(vanilla)
    with pytest.raises(VanillaModelError, match=r"another architecture.*`fc.weight` \(10, 512\) vs \(5, 512\)"):
        asr_fx.fuse(asr, into=vanilla)
    assert _same_state(vanilla, before)
    with pytest.raises(VanillaModelError, match=r"another architecture.*only in the fused model "
                                                r"\['layer1.0.conv1.weight'"):
        asr_fx.fuse(asr, into=SmallResidual())


def test_affine_free_norm_site_refuses_with_the_site_name():
    x = torch.randn(2, 3, 8, 8)
    asr = asr_fx.instrument(SmallResidual(affine=False), sites=["bn2"], bn_affine_form=False, example_inputs=(x,))
    perturb_asr(asr)
    vanilla = SmallResidual(affine=False)
    before = _state(vanilla)
    with pytest.raises(VanillaModelError, match=r"`bn2` \(BatchNorm2d\) gained a `weight`.*asr\.bn2.*affine=False"):
        asr_fx.fuse(asr.eval(), into=vanilla)
    assert _same_state(vanilla, before) and vanilla.training


def test_fold_bn_refuses_naming_the_conv_that_gained_a_bias():
    x = torch.randn(2, 3, 8, 8)
    asr = asr_fx.instrument(SmallResidual(), example_inputs=(x,)).eval()
    vanilla = SmallResidual()
    before = _state(vanilla)
    with pytest.raises(VanillaModelError, match=r"`conv1` \(Conv2d\) gained a `bias`"):
        asr_fx.fuse(asr, into=vanilla, fold_bn=True)
    assert _same_state(vanilla, before)


def test_a_scale_left_as_mul_refuses_with_the_site_name():
    x = torch.randn(2, 3, 8, 8)
    asr = asr_fx.instrument(SharedBN(), sites=["bn"], example_inputs=(x,), bn_affine_form=False)
    perturb_asr(asr)
    vanilla = SharedBN()
    before = _state(vanilla)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(VanillaModelError, match=r"site `asr\.\w+` .*stays a constant Mul"):
            asr_fx.fuse(asr.eval(), into=vanilla)
    assert _same_state(vanilla, before)


class FunctionalNorm(nn.Module):
    """``F.layer_norm`` without weights: a scale after it folds into a new constant weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return F.layer_norm(self.fc(x), (6,))


class AsrByHand(nn.Module):
    """An ASR block written by hand after a functional layer norm (fuse folds it into a new constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.psi = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return F.layer_norm(self.fc(x), (6,)) * torch.sigmoid(self.psi)


def test_a_new_folded_constant_refuses():
    x = torch.randn(3, 6)
    vanilla = FunctionalNorm()
    before = _state(vanilla)
    with pytest.raises(VanillaModelError, match=r"new constant `_folded_weight_layer_norm`"):
        asr_fx.fuse(AsrByHand().eval(), into=vanilla, example_inputs=(x,))
    assert _same_state(vanilla, before)


class OffByOne(SmallResidual):
    """Same parameters as SmallResidual, another forward."""

    def forward(self, x):
        return super().forward(x) + 1e-3


def test_a_vanilla_that_computes_otherwise_refuses_naming_the_output():
    x = torch.randn(2, 3, 8, 8)
    asr = _trained(SmallResidual(), x)
    vanilla = OffByOne()
    before = _state(vanilla)
    with pytest.raises(VanillaModelError, match=r"worst output output has max abs error"):
        asr_fx.fuse(asr, into=vanilla)
    assert _same_state(vanilla, before) and vanilla.training


class _ScalesItsInput(SmallResidual):
    """Writes into its input (``x.mul_(2)``) before the residual body."""

    def forward(self, x):
        x.mul_(2)
        return super().forward(x)


def test_into_a_model_that_writes_into_its_input_checks_both_on_the_same_input():
    """The output check gives each model its own copy of the probe: run on one shared tensor, the fused
    model's in-place write doubled the vanilla model's input and the check refused a correct model."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    asr = _trained(_ScalesItsInput(), x)
    vanilla = _ScalesItsInput()
    assert asr_fx.fuse(asr, strict=True, into=vanilla, example_inputs=(x,)) is vanilla
    probe = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(asr(probe.clone()), vanilla(probe.clone())) <= FUSE_RTOL


def test_into_the_instrumented_model_itself_refuses():
    asr = asr_fx.instrument(SmallResidual()).eval()
    with pytest.raises(VanillaModelError, match="freshly built"):
        asr_fx.fuse(asr, into=asr)


# ---------------------------------------------------------------- timm, Hugging Face, ultralytics


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    """One SGD step on every float output (nested outputs: HF ModelOutput, YOLO's list of maps)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = sum((t - 0.1).pow(2).mean() for _, t in flat_outputs(model(x)) if t.is_floating_point())
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_timm_efficientnet_into():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    make = lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)  # noqa: E731
    x = torch.randn(2, 3, 32, 32)
    asr = _trained(make(), x)  # instrumented directly: no sites, no leaf list
    assert len(asr_fx.get_config(asr)["sites"]) >= 5
    vanilla = make()
    assert asr_fx.fuse(asr, strict=True, into=vanilla, example_inputs=(x,)) is vanilla
    assert type(vanilla) is type(make())
    with torch.no_grad():
        assert rel_err(asr(x), vanilla(x)) <= FUSE_RTOL


def test_timm_instrumented_in_train_mode_fuses_into_timm_s_own_eval_forward():
    """timm's BatchNormAct2d traced in train mode keeps following train()/eval(): the fused
    weights in timm's own class compute what the instrumented model computes in eval mode, which with
    every v at 1 is timm's own eval forward (checked against a copy of the vanilla weights)."""
    timm = pytest.importorskip("timm")
    make = lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)  # noqa: E731
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    original = make().train()
    asr = asr_fx.instrument(original, example_inputs=(x,)).eval()
    vanilla = make()
    assert asr_fx.fuse(asr, into=vanilla, example_inputs=(x,)) is vanilla
    with torch.no_grad():
        ref, got = asr(x), vanilla(x)
        single = vanilla(x[:1])
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (single - got[:1]).abs().max() <= 1e-5 * got.abs().max()  # eval: no batch statistics


def _convnext():
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1],
                                         num_labels=5, layer_scale_init_value=0.5)
    return transformers.ConvNextForImageClassification, config


def test_hf_convnext_into_then_save_and_from_pretrained(tmp_path):
    cls, config = _convnext()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    asr = asr_fx.instrument(cls(config), example_inputs=(x,))  # directly, no wrapper
    perturb_asr(asr)
    _train_step(asr, x)
    asr.eval()
    with torch.no_grad():
        ref = asr(x).logits
    vanilla = cls(config)
    before = _state(vanilla)
    assert asr_fx.fuse(asr, strict=True, into=vanilla, example_inputs=(x,)) is vanilla
    assert type(vanilla) is cls and not _same_state(vanilla, before)
    assert n_params(vanilla) == n_params(cls(config))
    # layer scales folded into pwconv2 were written as ones (the vanilla forward still multiplies by them)
    assert torch.equal(vanilla.convnext.encoder.stages[1].layers[0].layer_scale_parameter, torch.ones(16))
    # tensors outside the parts (the classifier, moved by the SGD step) came from the instrumented model
    assert torch.equal(vanilla.classifier.weight, asr.classifier.weight)
    with torch.no_grad():
        assert rel_err(ref, vanilla(x).logits) <= FUSE_RTOL
    vanilla.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(ref, loaded(x).logits) <= FUSE_RTOL


def _yolo_features(out) -> torch.Tensor:
    """The Detect head's per-level maps (eval output ``(y, [maps])``): ``y``'s boxes are dominated by
    the anchor grid, the maps show every weight."""
    return torch.cat([t.flatten() for _, t in flat_outputs(out[1])])


def _yolo_into():
    """YOLOv8n from the package's yaml instrumented directly (captured whole, shape-aware), and a fresh
    ``YOLO`` from the yaml whose DetectionModel ``into=`` fills (checked here)."""
    ultralytics = pytest.importorskip("ultralytics")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = asr_fx.instrument(ultralytics.YOLO("yolov8n.yaml").model, example_inputs=(x,))
    config = asr_fx.get_config(model)
    folded = {s["fold_target"] for s in config["sites"]}
    assert folded and type(model).__name__ == "DetectionModel"
    perturb_asr(model)
    model.eval()
    with torch.no_grad():
        out = model(x)
    ref, ref_maps = out[0], _yolo_features(out)
    yolo = ultralytics.YOLO("yolov8n.yaml")
    vanilla = yolo.model
    assert asr_fx.fuse(model, strict=True, into=vanilla, example_inputs=(x,)) is vanilla
    # the sites' scales went into their layers: what differs from the instrumented model's tensors is
    # the affine of a layer a site folded into, everything else is the instrumented model's own
    ours, theirs = vanilla.state_dict(), model.state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert changed and all(k.rsplit(".", 1)[0] in folded for k in changed)
    with torch.no_grad():
        out = vanilla.eval()(x)
    assert rel_err(ref_maps, _yolo_features(out)) <= FUSE_RTOL and rel_err(ref, out[0]) <= FUSE_RTOL
    return yolo, vanilla, ref, x


def test_yolo_into():
    _yolo_into()


@pytest.mark.slow  # ultralytics' exporter with onnxslim: ~25 s on a shared 2-core machine
def test_yolo_into_then_ultralytics_onnx_matches_asr_fx_onnx(tmp_path, monkeypatch):
    yolo, vanilla, ref, x = _yolo_into()
    monkeypatch.chdir(tmp_path)
    exported = yolo.export(format="onnx", imgsz=64, verbose=False)  # ultralytics' own exporter (conv-BN fused)
    report = asr_fx.export_onnx(vanilla, tmp_path / "asr_fx.onnx", x, reference=vanilla)
    theirs = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    ours = ort.InferenceSession(str(tmp_path / "asr_fx.onnx"), providers=["CPUExecutionProvider"])
    a = theirs.run(None, {theirs.get_inputs()[0].name: x.numpy()})[0]
    b = ours.run(None, {ours.get_inputs()[0].name: x.numpy()})[0]
    assert a.shape == b.shape == tuple(ref.shape)
    # boxes, then class scores, each against its own scale. The scores of a randomly initialised YOLO
    # are sigmoid(~-11.5) ~ 1e-5 (ultralytics' bias init), where onnxruntime and torch differ by ~3e-4
    # relative; the two ONNX files agree with each other far closer than that
    for rows, to_torch in ((slice(0, 4), ORT_RTOL), (slice(4, None), 1e-3)):
        assert np.abs(a[:, rows] - b[:, rows]).max() <= ORT_RTOL * np.abs(b[:, rows]).max()
        assert np.abs(a[:, rows] - ref[:, rows].numpy()).max() <= to_torch * ref[:, rows].abs().max().item()
    assert report.verified


# ---------------------------------------------------------------- models instrumented part by part


def test_partial_model_into_fills_parts_and_the_rest():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    asr = _trained(CheckedResidual(), x)
    assert asr_fx.get_config(asr)["parts"] == ["body"]
    vanilla = CheckedResidual()
    assert asr_fx.fuse(asr, strict=True, into=vanilla) is vanilla  # probe: the recorded input shape
    assert type(vanilla) is CheckedResidual and not vanilla.training
    assert torch.equal(vanilla.head.weight, asr.head.weight)  # outside the parts, moved by the SGD step
    assert not torch.equal(vanilla.body.bn2.weight, asr.get_submodule("body.bn2").weight)  # the site folded in
    with torch.no_grad():
        assert rel_err(asr(x), vanilla(x)) <= FUSE_RTOL
    again = CheckedResidual().eval()
    again.load_state_dict(vanilla.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(asr(x), again(x)) <= FUSE_RTOL


def test_partial_model_refusals_name_the_part_and_leave_vanilla_untouched():
    x = torch.randn(2, 3, 8, 8)
    asr = _trained(CheckedResidual(), x)
    vanilla = CheckedResidual()
    before = _state(vanilla)
    with pytest.raises(VanillaModelError, match=r"part `body`: .*`conv1` \(Conv2d\) gained a `bias`"):
        asr_fx.fuse(asr, into=vanilla, fold_bn=True)
    assert _same_state(vanilla, before) and vanilla.training
    asr = _trained(CheckedResidual(affine=False), x)
    with pytest.raises(VanillaModelError, match=r"part `body`: .*gained a `weight`"):
        asr_fx.fuse(asr, into=CheckedResidual(affine=False))
    asr = _trained(CheckedResidual(), x)
    vanilla = CheckedResidual(classes=5)
    before = _state(vanilla)
    with pytest.raises(VanillaModelError, match=r"outside its instrumented parts \['body'\].*`head.weight` "
                                                r"\(4, 8, 1, 1\) vs \(5, 8, 1, 1\)"):
        asr_fx.fuse(asr, into=vanilla)
    assert _same_state(vanilla, before)
    with pytest.raises(VanillaModelError, match="freshly built"):
        asr_fx.fuse(asr, into=asr.body)


# ---------------------------------------------------------------- save_vanilla_state_dict


def test_save_vanilla_state_dict_is_atomic(tmp_path, monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    asr = _trained(SmallResidual(), x)
    vanilla = asr_fx.fuse(asr, into=SmallResidual())
    path = asr_fx.save_vanilla_state_dict(vanilla, tmp_path / "vanilla.pt")
    fresh = SmallResidual().eval()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        assert rel_err(asr(x), fresh(x)) <= FUSE_RTOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vanilla.pt"]

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    (tmp_path / "old.pt").write_bytes(b"old")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        asr_fx.save_vanilla_state_dict(vanilla, tmp_path / "new.pt")
    with pytest.raises(OSError, match="disk full"):
        asr_fx.save_vanilla_state_dict(vanilla, tmp_path / "old.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt", "vanilla.pt"]
    assert (tmp_path / "old.pt").read_bytes() == b"old"
    with pytest.raises(VanillaModelError, match="does not exist"):
        asr_fx.save_vanilla_state_dict(vanilla, tmp_path / "nope" / "v.pt")


# ---------------------------------------------------------------- asr-fx fuse --state-dict-out

CLI_FACTORY, CLI_KWARGS = "asr_fx.models:cifar_resnet", {"depth": 11, "num_classes": 10}


def _cli(*argv: str, cwd, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath is not None:  # where the checkpoint's factory module lives
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "asr_fx.cli", *argv], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def test_cli_state_dict_out_loads_strictly_into_the_factory_model(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    asr = _trained(asr_fx.build(CLI_FACTORY, **CLI_KWARGS), x)
    asr_fx.save(asr, tmp_path / "ckpt.pt")
    proc = _cli("fuse", "ckpt.pt", "-o", "m.onnx", "--state-dict-out", "vanilla.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote vanilla.pt" in proc.stdout
    vanilla = asr_fx.models.cifar_resnet(**CLI_KWARGS).eval()
    vanilla.load_state_dict(torch.load(tmp_path / "vanilla.pt", weights_only=True), strict=True)
    with torch.no_grad():
        assert rel_err(asr(x), vanilla(x)) <= FUSE_RTOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "m.onnx", "vanilla.pt"]


def test_cli_state_dict_out_refuses_fold_bn_and_writes_nothing(tmp_path):
    asr = asr_fx.instrument(asr_fx.build(CLI_FACTORY, **CLI_KWARGS), example_inputs=(torch.zeros(1, 3, 32, 32),))
    asr_fx.save(asr.eval(), tmp_path / "ckpt.pt")
    proc = _cli("fuse", "ckpt.pt", "-o", "m.onnx", "--fold-bn", "--state-dict-out", "vanilla.pt",
                cwd=tmp_path)
    assert proc.returncode != 0
    assert "gained a `bias`" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_cli_state_dict_out_path_checked_before_any_work(tmp_path, capsys):
    from asr_fx import cli

    (tmp_path / "ckpt.pt").write_bytes(b"not read")
    assert cli.main(["fuse", str(tmp_path / "ckpt.pt"), "-o", str(tmp_path / "m.onnx"),
                     "--state-dict-out", str(tmp_path / "nope" / "vanilla.pt")]) != 0
    assert "does not exist: create it first" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_cli_state_dict_out_for_a_model_instrumented_part_by_part(tmp_path):
    """A factory model whose top-level forward does not trace (a check on input values): captured part by part,
    saved, and ``--state-dict-out`` writes the state_dict its factory's model loads strictly."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    asr = _trained(asr_fx.build("into_models:checked_residual", classes=4), x)
    assert asr_fx.get_config(asr)["parts"] == ["body"] and type(asr) is CheckedResidual
    asr_fx.save(asr, tmp_path / "ckpt.pt")
    proc = _cli("fuse", "ckpt.pt", "-o", "m.onnx", "--state-dict-out", "vanilla.pt", cwd=tmp_path,
                pythonpath=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stderr
    assert "wrote vanilla.pt" in proc.stdout
    vanilla = CheckedResidual(classes=4).eval()
    vanilla.load_state_dict(torch.load(tmp_path / "vanilla.pt", weights_only=True), strict=True)
    with torch.no_grad():
        assert rel_err(asr(x), vanilla(x)) <= FUSE_RTOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "m.onnx", "vanilla.pt"]


class _VersionedStem(nn.Module):
    """Reads its state_dict version when loading, as torchvision's MNASNet does, and refuses none."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_fuse_writes_into_a_layer_that_reads_its_state_dict_version():
    torch.manual_seed(0)
    vanilla = nn.Sequential(_VersionedStem(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    model = asr_fx.instrument(vanilla, example_inputs=(x,)).eval()
    perturb_asr(model, 0)
    fused = asr_fx.fuse(model, example_inputs=(x,))
    assert type(fused) is nn.Sequential
    assert rel_err(model(x), fused(x)) <= FUSE_RTOL
    into = asr_fx.fuse(model, into=nn.Sequential(_VersionedStem(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    assert rel_err(model(x), into(x)) <= FUSE_RTOL
