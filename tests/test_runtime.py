"""Runtime choices: precision per device, the CPU allocator tuning, torch.compile of the step."""
from __future__ import annotations

import json
import math

import torch

from byol.config import load_config
from byol.train import runtime
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from byol.train.pretrain import pretrain
from byol.train.runtime import resolve_precision, tune_cpu_allocator
from conftest import TINY


def test_precision_auto_is_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cuda) == "bf16"
    for explicit in ("fp32", "bf16"):
        assert resolve_precision(explicit, cpu) == resolve_precision(explicit, cuda) == explicit
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"


def _no_isa_cap(monkeypatch):
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)


def test_native_bf16_probe_follows_the_cpu_flags(monkeypatch):
    _no_isa_cap(monkeypatch)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert runtime.cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert runtime.cpu_has_native_bf16() is torch.backends.mkldnn.is_available()


def test_precision_auto_honours_an_instruction_set_cap_below_bf16(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 (and the ATen and MKL caps) on a CPU with AMX: bf16 would be
    emulated, so auto keeps fp32 and the start summary says why."""
    _no_isa_cap(monkeypatch)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    cpu = torch.device("cpu")
    assert runtime.isa_cap_without_bf16() is None and resolve_precision("auto", cpu) == "bf16"
    for cap in ("ONEDNN_MAX_CPU_ISA=AVX2", "DNNL_MAX_CPU_ISA=avx512_core", "ATEN_CPU_CAPABILITY=avx2",
                "MKL_ENABLE_INSTRUCTIONS=AVX2"):
        name, value = cap.split("=")
        monkeypatch.setenv(name, value)
        assert runtime.isa_cap_without_bf16() == cap and resolve_precision("auto", cpu) == "fp32"
        monkeypatch.delenv(name)
    for native in ("ONEDNN_MAX_CPU_ISA=AVX512_CORE_AMX", "ONEDNN_MAX_CPU_ISA=avx512_core_bf16",
                   "ATEN_CPU_CAPABILITY=default", "ATEN_CPU_CAPABILITY=avx512"):
        name, value = native.split("=")
        monkeypatch.setenv(name, value)
        assert runtime.isa_cap_without_bf16() is None and resolve_precision("auto", cpu) == "bf16"
        monkeypatch.delenv(name)


def test_the_start_summary_says_an_isa_cap_kept_fp32(monkeypatch, tmp_path, capsys):
    _no_isa_cap(monkeypatch)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cfg = load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=16", "data.val_fraction=0",
                             "train.max_steps=1", f"train.out_dir={tmp_path}", "train.name=said"])
    assert pretrain(cfg).step == 1
    assert json.loads((tmp_path / "said" / "summary.json").read_text())["precision"] == "fp32"
    assert "device: cpu (fp32: ONEDNN_MAX_CPU_ISA=AVX2 caps the instruction set below native bf16)" in \
        capsys.readouterr().out


def test_allocator_tuning_applies_on_linux_only(monkeypatch):
    import sys

    if sys.platform.startswith("linux"):
        assert tune_cpu_allocator() is True  # glibc accepted every mallopt call
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert tune_cpu_allocator() is False


def _run(tmp_path, name, *extra):
    cfg = load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=16", "data.val_fraction=0",
                             "train.max_steps=2", "train.precision=fp32", f"train.out_dir={tmp_path}",
                             f"train.name={name}", *extra])
    result = pretrain(cfg)
    return result, load_checkpoint(find_checkpoint(result.run_dir))["model"]


def test_compiled_step_matches_the_eager_step(tmp_path):
    """train.compile=true compiles the model in place: the checkpoint keeps the eager names and the
    weights after two steps agree with the eager run (compiled kernels may reorder float sums)."""
    eager, a = _run(tmp_path, "eager")
    compiled, b = _run(tmp_path, "compiled", "train.compile=true")
    assert compiled.step == eager.step == 2
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-2, atol=5e-4), k
    rows = [json.loads(r) for r in (compiled.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
