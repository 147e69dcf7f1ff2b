"""export_onnx and verify_onnx: atomic files, temporary folders after signals and kills, external data,
input/output names, dynamic shapes, keyword inputs, dtype-aware tolerances and clear refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import onnx
import pytest
import torch
from torch import nn

import asr_fx
from asr_fx import atomic, export
from asr_fx.errors import OutputPathError


def small(out: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, out)).eval()


def leftovers(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.lstrip(".").startswith(atomic.PREFIX))


def test_names_in_the_report_are_the_names_in_the_file(tmp_path):
    report = asr_fx.export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8),
                                input_names=["image"], output_names=["logits"])
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in proto.graph.input] == ["image"] == report.input_names
    assert [o.name for o in proto.graph.output] == ["logits"] == report.output_names
    assert [o.name for o in report.outputs] == ["logits"]
    # without names the report still uses the file's own output name, not "output0"
    report = asr_fx.export_onnx(small(), tmp_path / "n.onnx", torch.randn(1, 3, 8, 8))
    assert [o.name for o in report.outputs] == [o.name for o in onnx.load(str(tmp_path / "n.onnx")).graph.output]


def test_dynamic_batch_height_and_width_verified_at_several_sizes(tmp_path):
    report = asr_fx.export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8),
                                dynamic=("batch", "height", "width"))
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    names = [o.name for o in report.outputs]
    assert any("(batch 7)" in n for n in names) and any("(12x10)" in n for n in names) and report.ok
    with pytest.raises(asr_fx.InvalidOptionError, match="unknown dynamic axis 'depth'"):
        asr_fx.export_onnx(small(), tmp_path / "x.onnx", torch.randn(1, 3, 8, 8), dynamic=("depth",))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.conv(image) * mask


def test_dict_inputs_are_keyword_inputs(tmp_path):
    inputs = {"image": torch.randn(1, 3, 4, 4), "mask": torch.rand(1, 1, 4, 4)}
    report = asr_fx.export_onnx(TwoInputs().eval(), tmp_path / "m.onnx", inputs)
    assert report.ok and report.verified and report.input_names == ["image", "mask"]


def test_external_data_written_under_final_names_as_a_pair(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 100)  # as if the model were over 2 GiB
    report = asr_fx.export_onnx(small(), tmp_path / "big.onnx", torch.randn(1, 3, 8, 8))
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"] and report.external_data == ["big.onnx.data"]
    proto = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("big.onnx", "big.onnx.data"):  # moved together, the pair still loads and verifies
        os.replace(tmp_path / name, moved / name)
    again = asr_fx.verify_onnx(moved / "big.onnx", small(), torch.randn(1, 3, 8, 8))
    assert again.ok


def test_verify_onnx_names_a_different_model_before_comparing_numbers(tmp_path):
    asr_fx.export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    bigger = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(asr_fx.DifferentModelError, match="is a different model: it holds 269 weights.*2,117"):
        asr_fx.verify_onnx(tmp_path / "m.onnx", bigger.eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(asr_fx.InputShapeError, match=r"input of shape \[1, 3, 9, 9\].*\[1, 3, 8, 8\]") as info:
        asr_fx.verify_onnx(tmp_path / "m.onnx", small(), torch.randn(1, 3, 9, 9))
    assert info.value.shape == [1, 3, 9, 9]
    other = small()
    other[-1].weight.data += 1  # same architecture, other weights: the numbers say it
    with pytest.raises(asr_fx.VerificationError, match="disagrees"):
        asr_fx.verify_onnx(tmp_path / "m.onnx", other, torch.randn(1, 3, 8, 8))


def test_meta_and_bfloat16_models_are_refused_clearly(tmp_path):
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(asr_fx.UnsupportedModelError, match="meta device") as info:
        asr_fx.export_onnx(meta, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert info.value.reason == "meta"
    with pytest.raises(asr_fx.UnsupportedModelError, match="bfloat16.*model.float()") as info:
        asr_fx.export_onnx(small().to(torch.bfloat16), tmp_path / "b.onnx",
                           torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))
    assert info.value.reason == "dtype" and os.listdir(tmp_path) == []


def test_float16_gets_a_float16_tolerance():
    from asr_fx.verify import DEFAULT_RTOL, default_rtol

    assert default_rtol(small()) == 1e-4 == DEFAULT_RTOL[torch.float32]
    assert default_rtol(small().half()) == DEFAULT_RTOL[torch.float16] == 1e-2


def test_output_folder_checked_before_work(tmp_path, monkeypatch):
    with pytest.raises(OutputPathError, match="does not exist") as info:
        atomic.check_writable(tmp_path / "missing" / "m.onnx")
    assert info.value.path.endswith("m.onnx")
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)  # a read-only folder (root could write anyway)
    with pytest.raises(OutputPathError, match="is not writable"):
        asr_fx.export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert os.listdir(tmp_path) == []


def test_failed_export_leaves_nothing_beside_the_output(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return x
            return -x

    with pytest.raises(asr_fx.ExportError):
        asr_fx.export_onnx(Broken(), tmp_path / "m.onnx", torch.randn(1, 3))
    assert os.listdir(tmp_path) == []


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from asr_fx import atomic
    with atomic.temp_folder(sys.argv[1], "export") as folder:
        (folder / "m.onnx").write_bytes(b"partial")
        print(folder, flush=True)
        time.sleep(60)
""")


def _start(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    folder = proc.stdout.readline().strip()
    assert os.path.isdir(folder)
    return proc, folder


def test_sigterm_and_sigint_leave_no_temporary_folder(tmp_path):
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc, folder = _start(tmp_path)
        proc.send_signal(signum)
        proc.wait(timeout=30)
        assert proc.returncode != 0 and not os.path.exists(folder) and leftovers(tmp_path) == []


def test_a_killed_run_leaves_a_folder_the_next_run_removes(tmp_path):
    proc, folder = _start(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert leftovers(tmp_path) == [os.path.basename(folder)]  # SIGKILL cannot be caught
    asr_fx.export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))  # the next run
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_an_old_folder_of_a_live_process_is_stale_after_an_hour(tmp_path):
    live = tmp_path / f".{atomic.PREFIX}{os.getppid()}-export-abc"
    live.mkdir()
    assert atomic.remove_stale_temp_folders(tmp_path) == []  # its process runs: kept
    old = time.time() - atomic.STALE_SECONDS - 10
    os.utime(live, (old, old))
    assert atomic.remove_stale_temp_folders(tmp_path) == [str(live)]


def test_unused_parameters_are_not_a_different_model(tmp_path):
    class WithAux(nn.Module):  # an aux head the eval forward never uses, 10x the used weights
        def __init__(self) -> None:
            super().__init__()
            self.body, self.aux = small(), nn.Linear(64, 64)

        def forward(self, x):
            return self.body(x)

    report = asr_fx.export_onnx(WithAux().eval(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert report.ok and report.verified


EXPORT_LOOP = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import asr_fx
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    print("ready", flush=True)
    while True:
        asr_fx.export_onnx(model, sys.argv[1], torch.randn(1, 3, 8, 8))
""")


def test_sigterm_during_a_real_export_leaves_the_output_whole_and_no_temporary_folder(tmp_path):
    out = tmp_path / "m.onnx"
    proc = subprocess.Popen([sys.executable, "-c", EXPORT_LOOP, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(4)  # some exports done, one under way
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) in ([], ["m.onnx"])
    if out.exists():
        onnx.checker.check_model(str(out))
