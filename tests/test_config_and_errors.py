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
from asr_fx.config import ASRConfig, META_KEY

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
    assert asr_fx.FusionError("x", report).report is report and asr_fx.FusionError("x").report is None


def test_unknown_attention_carries_the_name_and_the_registered_ones():
    with pytest.raises(asr_fx.UnknownAttentionError) as info:
        asr_fx.attention.create("sse", 8)
    assert info.value.name == "sse" and "se" in info.value.registered


def test_config_is_recorded_once_and_round_trips():
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11), delta=2)
    config = asr_fx.asr_config(model)
    assert isinstance(config, ASRConfig) and META_KEY not in getattr(model, "meta", {})  # one record: the attribute
    assert ASRConfig.from_dict(config.to_dict()) == config
    assert asr_fx.get_config(model)["version"] == 1 and asr_fx.get_config(model)["norm_fused"] is False
    assert asr_fx.asr_config(copy.deepcopy(model)) == config
    assert asr_fx.asr_config(pickle.loads(pickle.dumps(model))) == config


def test_norm_fused_reads_the_same_in_instrument_and_in_instrument_from_config():
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11))
    assert asr_fx.get_config(model)["norm_fused"] is True  # delta 1: on, as instrument documents
    unset = ASRConfig(sites=asr_fx.asr_config(model).sites)  # norm_fused None: as instrument resolves it
    again = instrument_from_config(asr_fx.build(FACTORY, depth=11), unset)
    assert asr_fx.get_config(again)["norm_fused"] is True
    assert set(again.state_dict()) == set(model.state_dict())


def test_old_configs_load_from_dicts_and_from_meta():
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11))
    old = {k: v for k, v in asr_fx.get_config(model).items() if k not in ("version", "norm_fused")}
    assert ASRConfig.from_dict(old).norm_fused is False  # recorded before the option existed
    vanilla = asr_fx.build(FACTORY, depth=11)
    vanilla.meta = {META_KEY: dict(old)}  # where asr-fx 0.1 also kept it
    assert asr_fx.asr_config(vanilla).sites == asr_fx.asr_config(model).sites
    vanilla.__dict__.pop("meta")
    vanilla.asr_fx_config = dict(old, norm_fused=True)  # the attribute, as a plain dict
    assert asr_fx.asr_config(vanilla).norm_fused is True
    with pytest.raises(asr_fx.CheckpointError, match="version 9"):
        ASRConfig.from_dict({"version": 9})


def test_save_load_keeps_the_config(tmp_path):
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=11), example_inputs=(torch.zeros(1, 3, 32, 32),))
    asr_fx.save(model, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["asr"]["version"] == 1 and "factory" not in raw["asr"]
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
