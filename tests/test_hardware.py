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
    hardware.auto_attention.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield
    hardware.cpu_bf16_is_fast.cache_clear()
    hardware.auto_attention.cache_clear()


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


# ------------------------------------------------------------------------------ attention kernel


def _attention(monkeypatch, sdpa_s: float, eager_s: float):
    calls = []

    def seconds(implementation, dtype, *a, **k):
        calls.append((implementation, dtype))
        return {"sdpa": sdpa_s, "eager": eager_s}[implementation]

    monkeypatch.setattr(hardware, "attention_seconds", seconds)
    return calls


@pytest.mark.parametrize("sdpa_s,expected", [(0.09, "eager"), (0.045, None)])
def test_auto_attention_follows_the_measured_probe_in_bfloat16(monkeypatch, tmp_path, sdpa_s, expected):
    _cpu(monkeypatch, {"avx512_bf16"}, fp32=100, bf16=300)
    calls = _attention(monkeypatch, sdpa_s=sdpa_s, eager_s=0.04)
    assert hardware.auto_attention("cpu", "bfloat16") == expected
    hardware.auto_attention.cache_clear()
    assert hardware.auto_attention("cpu", "bfloat16") == expected
    assert len(calls) == 2  # one probe (sdpa + eager), then the cache in hardware.json
    resolved = stages.resolve(load_config(overrides=["model.dtype=auto"]))
    assert (resolved.model.dtype, resolved.model.attn_implementation) == ("bfloat16", expected)


def test_attention_is_never_probed_in_float32_on_cuda_or_when_set(monkeypatch):
    _cpu(monkeypatch, {"avx2"})
    calls = _attention(monkeypatch, sdpa_s=1.0, eager_s=0.01)
    assert hardware.auto_attention("cpu", "float32") is None
    assert hardware.auto_attention("cuda", "bfloat16") is None
    assert hardware.auto_attention("cpu", "bfloat16") is None  # emulated bf16: auto never picks it
    explicit = stages.resolve(load_config(overrides=["model.dtype=bfloat16", "model.attn_implementation=sdpa"]))
    assert explicit.model.attn_implementation == "sdpa"
    _cpu(monkeypatch, {"avx512_bf16"}, fp32=100, bf16=300)
    hardware.cpu_bf16_is_fast.cache_clear()
    default = stages.resolve(load_config(overrides=["model.attn_implementation=null"]))  # transformers' own
    assert (default.model.dtype, default.model.attn_implementation) == ("bfloat16", None)
    assert calls == []


def test_the_attention_choice_is_part_of_the_stage_keys(monkeypatch):
    _cpu(monkeypatch, {"avx512_bf16"}, fp32=100, bf16=300)
    _attention(monkeypatch, sdpa_s=0.09, eager_s=0.04)
    auto = stages.stage_dirs(load_config())
    sdpa = stages.stage_dirs(load_config(overrides=["model.attn_implementation=sdpa"]))
    assert auto["align"] != sdpa["align"]
    fp32 = stages.resolve(load_config(overrides=["model.dtype=float32"]))
    assert fp32.model.attn_implementation is None  # float32 keys are as before


def test_both_attention_formulas_of_the_probe_agree():
    """The probe times the same mathematics both ways (else its verdict would compare different work)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 1, 16, 16).clone()
    mask[0, :, :, 12:] = False
    torch.testing.assert_close(hardware.attention("eager", q, k, v, mask), hardware.attention("sdpa", q, k, v, mask))
    assert hardware.attention_seconds("eager", torch.float32, (2, 3, 16, 8), reps=1) > 0


# ------------------------------------------------------------------------------ adapter precision


def test_adapter_compute_resolves_by_dtype_and_float32_keeps_the_former_keys(monkeypatch):
    _cpu(monkeypatch, {"avx512_bf16"}, fp32=100, bf16=300)
    _attention(monkeypatch, sdpa_s=0.09, eager_s=0.04)
    bf16 = stages.resolve(load_config(overrides=["model.dtype=bfloat16"]))
    fp32 = stages.resolve(load_config(overrides=["model.dtype=float32"]))
    assert (bf16.model.adapter_compute, fp32.model.adapter_compute) == ("model", "float32")
    dirs = {v: stages.stage_dirs(load_config(overrides=["model.dtype=bfloat16", f"model.adapter_compute={v}"]))["align"]
            for v in ("auto", "model", "float32")}
    assert dirs["auto"] == dirs["model"] != dirs["float32"]
    # at float32 the field leaves the key: the key is what it was before the field existed
    cfg = stages.resolve(load_config(overrides=["model.dtype=float32"]))
    former = {k: v for k, v in cfg.model.model_dump(mode="json").items() if k != "adapter_compute"}
    assert stages._key(cfg.model) == former
    assert "adapter_compute" in stages._key(bf16.model)
