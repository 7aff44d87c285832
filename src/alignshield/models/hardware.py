"""Which dtype is fast on this machine: ``model.dtype=auto`` resolved from the hardware.

bfloat16 halves memory and, where the hardware has it, runs matmuls 2-3x faster than float32. Where it
does not (every AVX2-only x86 CPU, most laptops), PyTorch emulates it and a matmul runs ~100x slower.
So ``auto`` is:

- CUDA: bfloat16 when the device supports it natively (Ampere and newer), float32 otherwise;
- CPU: bfloat16 only when the CPU advertises bf16 instructions (x86 ``avx512_bf16`` / ``amx_bf16``,
  Arm ``bf16``) AND a short measured probe (a model-shaped matmul in both dtypes) finds it faster than
  float32; float32 otherwise. The probe's verdict is cached per machine (CPU model, flags, torch
  version, threads) in ``<cache>/hardware.json``, so it runs once.

An explicit dtype is obeyed; when it is emulated here, ``dtype_warning`` says so (the CLI prints it).

The attention kernel follows the same rule (``auto_attention``): on a CPU, ``model.attn_implementation=auto``
(the default) becomes ``eager`` where a measured probe (one training-shaped attention forward + backward) finds
it faster than ``sdpa`` in the dtype in use, cached beside the dtype probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NATIVE_FLAGS = {
    "bfloat16": frozenset({"avx512_bf16", "amx_bf16", "bf16"}),  # x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16)
    "float16": frozenset({"avx512_fp16", "amx_fp16", "fphp", "asimdhp"}),
}
PROBE_SHAPE = (512, 576, 1536)  # tokens x hidden x MLP width of the embedded model: what training multiplies
FASTER_BY = 1.15  # bf16 must beat float32 by this factor to be chosen (noise margin)
CACHE_FILE = "hardware.json"


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native(dtype: str, flags: frozenset[str] | None = None) -> bool | None:
    """True/False when the CPU flags say whether ``dtype`` has hardware support; None when unknown."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return bool(NATIVE_FLAGS[dtype] & flags)


def matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, reps: int = 5,
                  budget_s: float = 2.0) -> float:
    """Best-of-``reps`` GFLOPS of an (m x k) @ (k x n) matmul on the CPU; stops early past ``budget_s``."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up (kernel selection, page faults)
    best, start = float("inf"), time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return 2 * m * k * n / best / 1e9


def _fingerprint() -> str:
    parts = [platform.machine(), cpu_model(), " ".join(sorted(cpu_flags() or ())), torch.__version__,
             str(torch.get_num_threads())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cache_path() -> Path:
    from alignshield.models.load import cache_dir

    return cache_dir() / CACHE_FILE


def _cached_probe(key: str, measure) -> dict:
    """``measure()``'s result, cached under ``key`` in ``<cache>/hardware.json`` (measured once per machine)."""
    from alignshield.io import write_json_atomic

    path = _cache_path()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]
    result = measure()
    try:
        write_json_atomic(path, cached | {key: result})
    except OSError as err:  # a read-only cache only costs the probe again next time
        log.debug("cannot cache the hardware probe in %s: %s", path, err)
    return result


def probe_cpu_bf16() -> dict:
    """Measured float32 vs bfloat16 matmul speed on this CPU, cached per machine."""
    def measure() -> dict:
        fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
        return {"cpu": cpu_model(), "float32_gflops": round(fp32, 1), "bfloat16_gflops": round(bf16, 1),
                "bfloat16_faster": bf16 >= FASTER_BY * fp32}

    return _cached_probe(_fingerprint(), measure)


@lru_cache(maxsize=None)
def cpu_bf16_is_fast() -> bool:
    """bfloat16 is native on this CPU (flags) and measured faster than float32 (cached probe)."""
    if cpu_has_native("bfloat16") is False:
        return False  # emulated: no need to measure a ~100x slowdown
    return bool(probe_cpu_bf16()["bfloat16_faster"])


ATTENTION_PROBE = (8, 9, 128, 64)  # batch x heads x tokens x head width: an embedded training batch


def attention_seconds(implementation: str, dtype: torch.dtype, shape: tuple[int, int, int, int] = ATTENTION_PROBE,
                      reps: int = 3) -> float:
    """Best-of-``reps`` seconds of one attention forward + backward with a causal padding mask (what
    a training step computes per layer), by transformers' ``sdpa`` or ``eager`` formula."""
    b, h, t, d = shape
    q, k, v = (torch.randn(b, h, t, d, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).clone()
    mask[0, :, :, t - t // 8:] = False  # some padding, as in a batch of unequal lengths

    def step():
        attention(implementation, q, k, v, mask).sum().backward()

    step()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best


def attention(implementation: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """softmax(q k^T / sqrt(d), masked) v by ``sdpa`` or by transformers' ``eager_attention_forward``
    (scores in the dtype, softmax in float32)."""
    import torch.nn.functional as F

    if implementation == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = scores.masked_fill(~mask, torch.finfo(q.dtype).min).softmax(-1, dtype=torch.float32)
    return weights.to(q.dtype) @ v


def probe_cpu_attention(dtype: str) -> dict:
    """Measured sdpa vs eager attention (forward + backward) in ``dtype`` on this CPU, cached per machine."""
    def measure() -> dict:
        sdpa, eager = (attention_seconds(kind, getattr(torch, dtype)) for kind in ("sdpa", "eager"))
        return {"cpu": cpu_model(), "dtype": dtype, "sdpa_ms": round(1e3 * sdpa, 2),
                "eager_ms": round(1e3 * eager, 2), "eager_faster": sdpa >= FASTER_BY * eager}

    return _cached_probe(f"{_fingerprint()}/attention/{dtype}", measure)


@lru_cache(maxsize=None)
def auto_attention(device: str, dtype: str) -> str | None:
    """The attention ``model.attn_implementation=auto`` resolves to: ``eager`` on a CPU where, in this
    dtype, it measured faster than ``sdpa`` (PyTorch's CPU flash kernel is slow in bfloat16 with a
    padding mask: 2-3x slower than eager on an AVX512-BF16 EPYC); None (transformers' default, sdpa)
    elsewhere, CUDA included, and in float32, where sdpa is the faster one."""
    if device != "cpu" or dtype == "float32" or (dtype == "bfloat16" and not cpu_bf16_is_fast()):
        return None
    return "eager" if probe_cpu_attention(dtype)["eager_faster"] else None


def cuda_bf16_is_native() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


def auto_dtype(device: str) -> str:
    """The dtype ``model.dtype=auto`` resolves to on ``device`` ("cuda..." or "cpu")."""
    if device.startswith("cuda"):
        return "bfloat16" if cuda_bf16_is_native() else "float32"
    if device == "cpu":
        return "bfloat16" if cpu_bf16_is_fast() else "float32"
    return "float32"  # mps and others: the safe choice


def dtype_warning(dtype: str, device: str) -> str | None:
    """A warning when an explicitly chosen dtype is emulated (slow) on ``device``, else None."""
    if device != "cpu" or dtype == "float32":
        return None
    if dtype == "bfloat16" and not cpu_bf16_is_fast():
        reason = ("the CPU has no bf16 instructions" if cpu_has_native("bfloat16") is False
                  else "it measured no faster than float32 here")
    elif dtype == "float16" and cpu_has_native("float16") is not True:
        reason = "the CPU has no fp16 arithmetic"
    else:
        return None
    return (f"model.dtype={dtype} is emulated on this CPU ({cpu_model()}): {reason}, so training and "
            f"generation may run many times slower than in float32. model.dtype=auto chooses float32 here.")
