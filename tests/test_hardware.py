"""model.dtype=auto follows the hardware (capabilities mocked both ways); explicit dtypes are obeyed."""

import logging

import pytest
import torch

from alignshield import stages
from alignshield.config import load_config
from alignshield.models import hardware
from alignshield.models.load import resolve_dtype


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNSHIELD_CACHE", str(tmp_path / "cache"))
    hardware.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield
    hardware.cpu_bf16_is_fast.cache_clear()


def _cpu(monkeypatch, flags, fp32=100.0, bf16=300.0):
    calls = []

    def gflops(dtype, *a, **k):
        calls.append(dtype)
        return {torch.float32: fp32, torch.bfloat16: bf16}[dtype]

    monkeypatch.setattr(hardware, "cpu_flags", lambda: None if flags is None else frozenset(flags))
    monkeypatch.setattr(hardware, "matmul_gflops", gflops)
    return calls


def test_cpu_without_bf16_instructions_gets_float32_without_a_probe(monkeypatch):
    calls = _cpu(monkeypatch, {"avx2", "fma"})
    assert hardware.auto_dtype("cpu") == "float32"
    assert calls == []  # an emulated dtype is never timed


def test_cpu_with_native_bf16_that_is_faster_gets_bfloat16_and_the_probe_is_cached(monkeypatch, tmp_path):
    calls = _cpu(monkeypatch, {"avx2", "avx512_bf16"}, fp32=100, bf16=300)
    assert hardware.auto_dtype("cpu") == "bfloat16"
    assert (tmp_path / "cache" / "hardware.json").exists()
    hardware.cpu_bf16_is_fast.cache_clear()
    assert hardware.auto_dtype("cpu") == "bfloat16"
    assert len(calls) == 2  # one probe (float32 + bfloat16), then the cache


def test_native_bf16_that_measures_no_faster_gets_float32(monkeypatch):
    _cpu(monkeypatch, {"amx_bf16"}, fp32=100, bf16=105)
    assert hardware.auto_dtype("cpu") == "float32"


def test_unknown_flags_are_decided_by_the_probe(monkeypatch):
    _cpu(monkeypatch, None, fp32=100, bf16=250)
    assert hardware.auto_dtype("cpu") == "bfloat16"


@pytest.mark.parametrize("native,expected", [(True, "bfloat16"), (False, "float32")])
def test_cuda_follows_native_bf16_support(monkeypatch, native, expected):
    monkeypatch.setattr(hardware, "cuda_bf16_is_native", lambda: native)
    assert hardware.auto_dtype("cuda") == expected


def test_explicit_dtype_is_obeyed_with_a_warning_when_emulated(monkeypatch, caplog):
    _cpu(monkeypatch, {"avx2"})
    cfg = load_config(overrides=["model.dtype=bfloat16"])
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype(cfg.model) == "bfloat16"
    assert "emulated on this CPU" in caplog.text and "auto chooses float32" in caplog.text
    caplog.clear()
    _cpu(monkeypatch, {"avx512_bf16"})
    hardware.cpu_bf16_is_fast.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype(load_config(overrides=["model.dtype=bfloat16"]).model) == "bfloat16"
    assert "emulated" not in caplog.text


def test_auto_is_resolved_before_hashing_so_outputs_are_keyed_by_dtype(monkeypatch):
    cfg = load_config()
    assert cfg.model.dtype == "auto"
    _cpu(monkeypatch, {"avx2"})
    fp32 = stages.resolve(cfg)
    dirs_fp32 = stages.stage_dirs(cfg)
    _cpu(monkeypatch, {"avx512_bf16"})
    hardware.cpu_bf16_is_fast.cache_clear()
    bf16 = stages.resolve(cfg)
    assert (fp32.model.dtype, bf16.model.dtype) == ("float32", "bfloat16")
    assert stages.stage_dirs(cfg)["align"] != dirs_fp32["align"]
    explicit = load_config(overrides=["model.dtype=bfloat16"])
    assert stages.stage_dirs(explicit)["align"] == stages.stage_dirs(cfg)["align"]
