"""ultralytics: its own trainer trains the instrumented ``DetectionModel``, then ``fuse`` and its own export.

The way in is the trainer's ``get_model``: a ``DetectionTrainer`` subclass instruments the model ultralytics
builds (``YOLO(...).train(trainer=...)`` calls it with the dataset's class count), so the trainer's loss,
EMA, optimizer groups, checkpoints and final validation all see the instrumented model; its validator's
``get_model`` hands the final validation ``best.pt`` fused with asr_fx (ultralytics' own ``final_eval`` runs).
One epoch of yolov8n at 32x32 on four random images written by the test; nothing downloaded (no pretrained
weights, no AMP check, no fonts: ``plots=False``, ``amp=False``, ``YOLO_OFFLINE`` set in conftest, and the network
refused).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    FUSE_RTOL,
    ORT_RTOL,
    asr_values,
    assert_asr_trained,
    assert_own_model,
    assert_vanilla_form,
    calibrate_bn,
    perturb_asr,
    rel_err,
    without_asr,
    write_yolo_dataset,
)

import asr_fx

ultralytics = pytest.importorskip("ultralytics")
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, load_checkpoint  # noqa: E402

SIZE = 32


def _probe(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


class ASRDetectionValidator(DetectionValidator):
    """ultralytics' validator; the trainer's final validation of ``best.pt`` gets it fused with asr_fx first
    (ultralytics then loads it and applies its own Conv+BN fuse, which an instrumented model refuses)."""

    def get_model(self, model, trainer=None):
        if trainer is None and isinstance(model, (str, Path)):  # final_eval: the best.pt checkpoint
            with torch.inference_mode(False):
                model = load_checkpoint(model)[0].float().eval()
                x = torch.zeros(1, 3, self.args.imgsz, self.args.imgsz)
                return asr_fx.fuse(model, example_inputs=(x,))
        return super().get_model(model, trainer)


class ASRDetectionTrainer(DetectionTrainer):
    """ultralytics' detection trainer on the instrumented model (the whole change a user makes)."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        vanilla = super().get_model(cfg, weights, verbose)
        model = asr_fx.instrument(vanilla, example_inputs=(_probe(1),))
        self.asr_start = asr_values(model)  # for the test: what training starts from
        self.vanilla = vanilla
        return model

    def get_validator(self):
        return ASRDetectionValidator(self.test_loader, save_dir=self.save_dir, args=copy.copy(self.args),
                                     _callbacks=self.callbacks)


def _train_args(tmp_path) -> dict:
    return {"data": str(write_yolo_dataset(tmp_path / "data", size=SIZE)), "epochs": 1, "imgsz": SIZE, "batch": 2,
            "workers": 0, "device": "cpu", "plots": False, "amp": False, "val": False, "pretrained": False,
            "verbose": False, "project": str(tmp_path / "runs"), "name": "asr", "exist_ok": True}


def _detections(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eval output ultralytics exports (decoded boxes and class scores)."""
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.flatten()]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item)]


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every tensor of the eval output (detections and the raw per-level maps), flattened into one."""
    model.eval()
    with torch.no_grad():
        return torch.cat(_tensors(model(x)))


def test_detection_model_loss_on_a_batch_backpropagates_to_psi():
    torch.manual_seed(0)
    vanilla = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    model = asr_fx.instrument(vanilla, example_inputs=(_probe(1),))
    assert_own_model(model, vanilla)
    model.args = ultralytics.cfg.get_cfg()  # what the trainer sets before calling loss
    batch = {"img": _probe(), "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2]])}
    model.train()
    loss, _ = model.loss(batch)
    assert torch.isfinite(loss).all() and loss.sum() > 0
    loss.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("psi"))


def test_ultralytics_own_conv_bn_fuse_keeps_or_refuses_asr():
    """``DetectionModel.fuse()`` (ultralytics folds each Conv's BN; its predict and val call it) must not drop
    the ASR blocks silently: the next forward raises DetachedBlockError naming the way out, and the way out
    (``asr_fx.fuse`` first, then ultralytics' fuse) computes what the instrumented model computes."""
    torch.manual_seed(0)
    vanilla = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    calibrate_bn(vanilla, _probe(4))
    model = asr_fx.instrument(vanilla, example_inputs=(_probe(1),))
    perturb_asr(model, seed=1)
    x = _probe()
    want = _outputs(model, x)
    assert rel_err(want, _outputs(without_asr(model, vanilla), x)) > 1e-2  # the blocks act
    own_fused = copy.deepcopy(model).fuse(verbose=False)
    with pytest.raises(asr_fx.DetachedBlockError, match="asr_fx.fuse"):
        _outputs(own_fused, x)
    way_out = copy.deepcopy(asr_fx.fuse(model, example_inputs=(x,))).fuse(verbose=False)
    assert rel_err(want, _outputs(way_out, x)) <= FUSE_RTOL


def test_detection_trainer_one_epoch_then_fuse_and_onnx_export(tmp_path, no_network):
    yolo = ultralytics.YOLO("yolov8n.yaml")
    epoch_ends = []
    yolo.add_callback("on_fit_epoch_end", lambda trainer: epoch_ends.append(trainer.epoch))
    yolo.train(trainer=ASRDetectionTrainer, **_train_args(tmp_path))
    trainer = yolo.trainer
    # ultralytics' own final_eval ran: best.pt stripped of its optimizer, validated (fused with asr_fx, since
    # ultralytics' own fuse refuses an instrumented model), and logged through on_fit_epoch_end at epoch + 1
    assert torch.load(trainer.best, weights_only=False)["optimizer"] is None
    assert "metrics/mAP50(B)" in trainer.metrics and epoch_ends == [0, 1]
    assert_own_model(trainer.model, trainer.vanilla)
    assert_asr_trained(trainer.asr_start, trainer.model)
    trained = yolo.model  # ultralytics reloads its checkpoint (the EMA weights, pickled) after training
    assert_own_model(trained, trainer.vanilla)
    calibrate_bn(trained, _probe(4))  # 2 steps leave the random init's near-constant output: see calibrate_bn
    perturb_asr(trained, seed=2)  # v as far from its start as training would take it
    x = _probe()
    want = _outputs(trained, x)
    assert rel_err(want, _outputs(without_asr(trained, trainer.vanilla), x)) > 1e-2  # the blocks act

    fused = asr_fx.fuse(trained, example_inputs=(x,))
    assert_vanilla_form(fused, trainer.vanilla)
    assert fused.names == trained.names and torch.equal(fused.stride, trained.stride)
    assert rel_err(want, _outputs(fused, x)) <= FUSE_RTOL

    yolo.model = fused
    path = yolo.export(format="onnx", imgsz=SIZE, simplify=False, device="cpu")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    one = x[:1]
    (got,) = session.run(None, {session.get_inputs()[0].name: one.numpy()})[:1]
    ref = _detections(fused, one).numpy()
    assert np.abs(got - ref).max() <= ORT_RTOL * np.abs(ref).max()
