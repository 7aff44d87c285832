"""Tiny models and tokenizers built in code: no downloads, seconds to train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: positive negative World Sports Business Sci/Tech",
    "I'm sorry, I cannot help with that. It is illegal and harmful. Here is how to do it step by step.",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 The final answer is: ####",
]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    # like SmolLM2: no pad token, so the loader makes pad = eos
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


TINY_FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gpt2", "opt", "gpt_neox", "phi"]


def tiny_config(family: str = "llama", vocab_size: int = 320, layers: int = 2, hidden: int = 32):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, tie_word_embeddings=False)
    shapes = {
        "gpt2": dict(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256),
        "opt": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, ffn_dim=64,
                    word_embed_proj_dim=hidden, max_position_embeddings=256),
        "gpt_neox": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=256),
        "phi": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=256),
    }
    default = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=256, head_dim=hidden // 4)
    return AutoConfig.for_model(family, **common, **shapes.get(family, default))


def make_model(family: str = "llama", layers: int = 2, seed: int = 0, dtype=torch.float32, attention=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    extra = {"attn_implementation": attention} if attention else {}
    return AutoModelForCausalLM.from_config(tiny_config(family, layers=layers), dtype=dtype, **extra)


def random_lora_model(seed: int = 0, r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj"), scale: float = 1.0,
                      base_seed: int | None = None):
    """A float64 tiny Llama (weights from ``base_seed``, default ``seed``) with a LoRA whose factors are
    all random (``scale`` * N(0, 1), drawn from ``seed + 10``): an adapter as a trained one looks."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model("llama", dtype=torch.float64, seed=seed if base_seed is None else base_seed),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer saved like any Hugging Face checkpoint, loadable by path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", layers=2).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


TINY_RUN = [  # align -> finetune -> evaluate on the tiny Llama in seconds
    "model.dtype=float32", "align.data.safety.stop=8", "align.data.benign.stop=8",
    "align.train.max_steps=2", "align.train.batch_size=4", "align.train.max_length=48",
    "align.lora.target_modules=[q_proj,v_proj]", "finetune.lora.target_modules=[q_proj,v_proj]",
    "finetune.n=10", "finetune.train.max_steps=2", "finetune.train.batch_size=4",
    "finetune.train.max_length=48", "evaluate.harmful.stop=4", "evaluate.task_n=4",
    "evaluate.max_new_tokens=4",
]


def tiny_run_config(model_dir: Path, output_dir: Path, *extra: str):
    """The tiny run's config; ``extra`` dotted overrides come last, so they win."""
    from alignshield.config import load_config

    return load_config(overrides=[f"model.name={model_dir}", f"output_dir={output_dir}", *TINY_RUN, *extra])


@pytest.fixture
def make_cfg(tiny_model_dir, tmp_path):
    return lambda *extra: tiny_run_config(tiny_model_dir, tmp_path, *extra)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows), encoding="utf-8")
    return path


def interrupted_and_resumed(make, tmp_path: Path, stop_after: int):
    """(full, resumed): ``make(folder)`` trained to the end in ``full/``; and a trainer stopped after
    ``stop_after`` steps with a checkpoint in ``cut/``, then built anew on that folder (not trained yet:
    the caller may tamper with it before ``resumed.train()``)."""
    full = make(tmp_path / "full")
    full.train()
    cut = make(tmp_path / "cut")
    cut.total_steps = stop_after
    cut.train()
    cut._save_checkpoint()
    return full, make(tmp_path / "cut")
