"""FSDP2 (``fully_shard``): an instrumented model trained by 2 gloo processes on the CPU equals one process
training on the same global batch (one FSDP unit, or one per residual block then the root, with the blocks
in the BN form or the output form), and its ``torch.distributed.checkpoint`` folder loads with
``asr_fx.load`` and fuses through ``asr-fx fuse DIR``.

The model's BatchNorms run in eval mode while training: in train mode each rank would normalise with
its own half batch's statistics (as in any data-parallel run without SyncBatchNorm), which is not the
single-process function; psi, the attention networks and every other parameter still train.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, gloo_process_group, perturb_asr
from torch import nn

import asr_fx
from asr_fx.errors import CheckpointError
from asr_fx.models import cifar_resnet

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS, WORLD = 8, 3, 2
FACTORY, FACTORY_KWARGS = "asr_fx.models:cifar_resnet", {"depth": 11}


def _instrumented(bn_affine_form: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = asr_fx.instrument(cifar_resnet(depth=11), "se", bn_affine_form=bn_affine_form)
    perturb_asr(model, 0)
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(STEPS, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(STEPS, GLOBAL_BATCH, 10, generator=g)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.eval()  # see the module docstring: BN's statistics are not the thing under test
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[step]), y[step]).backward()
        opt.step()


def _fsdp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    with gloo_process_group(rank, world, port):
        model = _instrumented()  # the same init on every rank
        header = asr_fx.checkpoint_header(model, factory=FACTORY, factory_kwargs=FACTORY_KWARGS,
                                          input_shape=[1, 3, 16, 16])
        fully_shard(model)  # one unit (per-block units below)
        x, y = _data()
        local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        _train(model, x[:, local], y[:, local])  # the mean over each half, averaged over the ranks: the global mean
        state = model.state_dict()
        assert any(isinstance(v, DTensor) for v in state.values())  # it really was sharded
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
        if rank == 0:
            torch.save(full, f"{out_dir}/full.pt")
        dcp.save({"model": state, "asr_fx": header}, checkpoint_id=f"{out_dir}/with_header")
        dcp.save({"model": state}, checkpoint_id=f"{out_dir}/weights_only")
        for bn_affine_form in (True, False):  # one FSDP unit per residual block, then the root
            blocked = _instrumented(bn_affine_form)
            for layer in (blocked.layer1, blocked.layer2, blocked.layer3):
                for block in layer:
                    fully_shard(block)
            fully_shard(blocked)
            _train(blocked, x[:, local], y[:, local])
            full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in blocked.state_dict().items()}
            if rank == 0:
                torch.save(full, f"{out_dir}/per_block_{bn_affine_form}.pt")
        # the big-model flow: meta device -> instrument -> fully_shard -> to_empty -> reset_parameters
        with torch.device("meta"):
            vanilla = cifar_resnet(depth=11)
        meta = asr_fx.instrument(vanilla, "se", preset="transformer")
        fully_shard(meta)
        meta.to_empty(device="cpu")
        for module in meta.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
        asr = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in meta.state_dict().items()
               if k.startswith("asr.")}
        if rank == 0:
            torch.save(asr, f"{out_dir}/meta_asr.pt")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_fsdp_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def _single_process(bn_affine_form: bool = True) -> dict[str, torch.Tensor]:
    model = _instrumented(bn_affine_form)
    _train(model, *_data())
    return model.state_dict()


def test_fsdp2_two_processes_train_as_one_process_on_the_global_batch(fsdp_run):
    got = torch.load(fsdp_run / "full.pt", weights_only=True)
    want = _single_process()
    start = _instrumented().state_dict()
    assert got.keys() == want.keys()
    psi = [k for k in want if k.endswith(".psi")]
    assert len(psi) == 3
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert all(not torch.allclose(start[k], want[k]) for k in psi)  # psi did train


@pytest.mark.parametrize("bn_affine_form", [True, False], ids=["bn_form", "output_form"])
def test_fsdp2_one_unit_per_residual_block_trains_as_one_process(fsdp_run, bn_affine_form):
    got = torch.load(fsdp_run / f"per_block_{bn_affine_form}.pt", weights_only=True)
    want = _single_process(bn_affine_form)
    start = _instrumented(bn_affine_form).state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert all(not torch.allclose(start[k], want[k]) for k in want if k.endswith(".psi"))  # psi did train


def test_meta_device_instrument_fully_shard_to_empty_reset_gives_the_preset_init(fsdp_run):
    asr = torch.load(fsdp_run / "meta_asr.pt", weights_only=True)
    assert len([k for k in asr if k.endswith(".psi")]) == 3
    for key, value in asr.items():  # the transformer preset: psi and every attention parameter at 1e-3
        assert torch.equal(value, torch.full_like(value, 1e-3)), key


def test_fsdp2_dcp_folder_with_header_loads_with_asr_fx_load(fsdp_run):
    model = asr_fx.load(fsdp_run / "with_header")
    want = torch.load(fsdp_run / "full.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key
    fused = asr_fx.fuse(model)
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(cifar_resnet(depth=11))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_dcp_folder_without_header_is_refused_by_load_with_the_way_out(fsdp_run):
    with pytest.raises(CheckpointError, match=r"checkpoint_header.*--model package.module:factory"):
        asr_fx.load(fsdp_run / "weights_only")


@pytest.mark.parametrize("folder, extra", [("with_header", []),
                                           ("weights_only", ["--model", FACTORY, "--factory-args", '{"depth": 11}',
                                                             "--input-shape", "1,3,16,16"])])
def test_fsdp2_dcp_folder_fuses_through_the_cli(fsdp_run, tmp_path, folder, extra):
    out = tmp_path / "fused.onnx"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "asr_fx.cli", "fuse", str(fsdp_run / folder), "-o", str(out),
                          "--strict",
                          *extra], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert out.is_file()
    assert "torch.distributed.checkpoint folder" in run.stdout


def test_a_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    import pickle

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(print))  # any global outside DCP's metadata classes
    with pytest.raises(CheckpointError, match="trust"):
        asr_fx.load(folder)
