"""ASRConfig (one record of how a model was instrumented), the error tree, factory errors and the
input shapes models document about themselves."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torchvision
import transformers
from torch import nn

import asr_fx
from asr_fx import errors
from asr_fx.checkpoint import instrument_from_config
from asr_fx.config import META_KEY, ASRConfig

FACTORY = "asr_fx.models.resnet_cifar:cifar_resnet"


def test_every_public_error_is_an_asr_error_exported_from_asr_fx():
    public = [obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, Exception)]
    assert len(public) >= 15
    for error in public:
        assert issubclass(error, asr_fx.ASRError), error
        assert getattr(asr_fx, error.__name__) is error
    from asr_fx import cli, export
    from asr_fx.attention import UnknownAttentionError

    assert cli.UsageError is asr_fx.UsageError and export.ExportError is asr_fx.ExportError
    assert UnknownAttentionError is asr_fx.UnknownAttentionError and issubclass(UnknownAttentionError, ValueError)
    report = object()
    assert asr_fx.FusionError("x", report).report is report
    with pytest.raises(TypeError):  # the report is always given
        asr_fx.FusionError("x")  # type: ignore[call-arg]


def test_unknown_attention_carries_the_name_and_the_registered_ones():
    with pytest.raises(asr_fx.UnknownAttentionError) as info:
        asr_fx.attention.create("sse", 8)
    assert info.value.name == "sse" and "se" in info.value.registered


def test_config_is_recorded_once_and_round_trips():
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11), delta=2)
    config = asr_fx.asr_config(model)
    assert isinstance(config, ASRConfig) and META_KEY not in getattr(model, "meta", {})  # one record: the attribute
    assert ASRConfig.from_dict(config.to_dict()) == config
    assert asr_fx.get_config(model)["version"] == 2 and asr_fx.get_config(model)["bn_affine_form"] is False
    assert asr_fx.asr_config(copy.deepcopy(model)) == config
    assert asr_fx.asr_config(pickle.loads(pickle.dumps(model))) == config


def test_bn_affine_form_reads_the_same_in_instrument_and_in_instrument_from_config():
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11))
    assert asr_fx.get_config(model)["bn_affine_form"] is True  # delta 1: on, as instrument documents
    unset = ASRConfig(sites=asr_fx.asr_config(model).sites)  # bn_affine_form None: as instrument resolves it
    again = instrument_from_config(asr_fx.build(FACTORY, depth=11), unset)
    assert asr_fx.get_config(again)["bn_affine_form"] is True
    assert set(again.state_dict()) == set(model.state_dict())


def test_old_configs_load_from_dicts_and_from_meta():
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11))
    old = {k: v for k, v in asr_fx.get_config(model).items() if k not in ("version", "bn_affine_form")}
    assert ASRConfig.from_dict(old).bn_affine_form is False  # recorded before the option existed
    vanilla = asr_fx.build(FACTORY, depth=11)
    vanilla.meta = {META_KEY: dict(old)}  # where asr-fx 0.1 also kept it
    assert asr_fx.asr_config(vanilla).sites == asr_fx.asr_config(model).sites
    vanilla.__dict__.pop("meta")
    vanilla.asr_fx_config = dict(old, bn_affine_form=True)  # the attribute, as a plain dict
    assert asr_fx.asr_config(vanilla).bn_affine_form is True
    with pytest.raises(asr_fx.CheckpointError, match="version 9"):
        ASRConfig.from_dict({"version": 9})


@pytest.mark.parametrize("recorded", [True, False])
def test_version_1_configs_read_norm_fused_as_bn_affine_form(recorded):
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11))
    current = asr_fx.get_config(model)
    old = {k: v for k, v in current.items() if k != "bn_affine_form"}
    old.update(version=1, norm_fused=recorded)  # what asr-fx wrote before the rename
    config = ASRConfig.from_dict(old)
    assert config.bn_affine_form is recorded and "norm_fused" not in config.to_dict()
    assert config.instrument_options()["bn_affine_form"] is recorded


def test_a_checkpoint_with_a_version_1_config_loads_in_its_training_form(tmp_path):
    from asr_fx.asr import BatchNormAffineASR

    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11), bn_affine_form=False)
    asr_fx.save(model, tmp_path / "new.pt")
    checkpoint = torch.load(tmp_path / "new.pt", weights_only=True)
    configs = [v for v in checkpoint.values() if isinstance(v, dict) and "bn_affine_form" in v]
    assert configs, sorted(checkpoint)
    for config in configs:  # rewrite it as asr-fx wrote it before the rename
        config["version"], config["norm_fused"] = 1, True
        del config["bn_affine_form"]
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded = asr_fx.load(tmp_path / "old.pt")
    assert asr_fx.get_config(loaded)["bn_affine_form"] is True
    assert any(isinstance(m, BatchNormAffineASR) for m in loaded.modules())
    loaded.load_state_dict(model.state_dict())  # the same keys in either form


def test_save_load_keeps_the_config(tmp_path):
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11), example_inputs=(torch.zeros(1, 3, 32, 32),))
    asr_fx.save(model, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["asr"]["version"] == 2 and "factory" not in raw["asr"]
    loaded = asr_fx.load(tmp_path / "m.pt")
    assert asr_fx.asr_config(loaded) == asr_fx.asr_config(model)


def test_factory_errors_name_the_factory_and_the_keyword():
    with pytest.raises(asr_fx.FactoryError) as info:
        asr_fx.build(FACTORY, dept=11)
    error = info.value
    assert (error.factory, error.keyword, error.suggestion) == (FACTORY, "dept", "depth") and "depth" in error.accepted
    assert "'dept'" in str(error) and "did you mean 'depth'" in str(error) and "\n" not in str(error)
    with pytest.raises(asr_fx.FactoryError, match=r"factory 'asr_fx.models.resnet_cifar:cifar_resnet' raised "):
        asr_fx.build(FACTORY, depth=12)  # the factory's own refusal, named
    with pytest.raises(asr_fx.FactoryError, match="is a int, not a function") as info:
        asr_fx.build("asr_fx.config:VERSION")
    assert info.value.factory == "asr_fx.config:VERSION"
    assert issubclass(asr_fx.FactoryError, asr_fx.CheckpointError)  # callers catching that keep working


def test_default_input_shape_from_what_models_document():
    shape = asr_fx.default_input_shape
    resnet = timm.create_model("resnet10t")
    assert shape(resnet) == [1, *resnet.pretrained_cfg["input_size"]] == [1, 3, 176, 176]
    assert shape(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)) == [1, 3, 32, 32]
    assert shape(torchvision.models.resnet18()) == [1, 3, 224, 224]
    assert shape(torchvision.models.inception_v3(init_weights=False, aux_logits=False)) == [1, 3, 299, 299]
    config = transformers.ViTConfig(image_size=48, num_channels=1, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32)
    assert shape(transformers.ViTForImageClassification(config), batch=2) == [2, 1, 48, 48]
    assert shape(nn.Linear(3, 4)) is None
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11), example_inputs=(torch.zeros(4, 3, 32, 32),))
    assert shape(model) == [1, 3, 32, 32]


def test_unknown_sites_are_unknown_site_errors_with_a_plain_message():
    with pytest.raises(asr_fx.UnknownSiteError) as info:
        asr_fx.instrument(asr_fx.build(FACTORY, depth=11), sites=["layer9"])
    assert isinstance(info.value, KeyError) and str(info.value).startswith("sites=['layer9'] name no")


def test_an_onnx_file_the_runtime_cannot_load_is_an_onnx_file_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf")
    model = nn.Conv2d(3, 4, 1)
    with pytest.raises(asr_fx.OnnxFileError) as info:
        asr_fx.verify_onnx(path, model, torch.randn(1, 3, 4, 4))
    assert info.value.runtime == "onnxruntime" and info.value.path == str(path)
