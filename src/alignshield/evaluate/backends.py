"""Generation backends for the evaluation: Hugging Face ``generate`` (the default) or vLLM.

Both answer the same prompts with the same greedy decoding and return the same ``Generation``
(answers, truncation flags, token counts), so ``samples.jsonl`` and every metric mean the same:

* the prompts are tokenized once, here, by ``generate.encode_prompts`` (the same special tokens and
  left truncation to ``max_prompt_tokens``); vLLM is given those token ids, never the text;
* decoding is greedy (temperature 0, one sample) for ``max_new_tokens``, stopping at the model's end
  tokens; answers are decoded and cleaned by ``generate.safe_decode`` in both.

``vllm`` (``evaluate.backend=vllm``, GPU, ``pip install vllm``): vLLM loads models from disk, so the
evaluated model (base + merged adapters) is saved once into the evaluation's scratch folder and
loaded from there; it runs in one process (vLLM spreads a model over GPUs itself). Answers can differ
from HF's in near-ties (another kernel, another batching), as they can between two batch sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from alignshield.evaluate.generate import Generation, _end_ids, count_new_tokens, encode_prompts, generate_batch, \
    safe_decode

class Backend(Protocol):
    def generate(self, prompts: list[str], **options) -> Generation: ...


class HFBackend:
    """``generate_batch``: length-sorted batches, prefix sharing, the model in memory."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts: list[str], **options) -> Generation:
        return generate_batch(self.model, self.tokenizer, prompts, **options)


class VLLMBackend:
    """vLLM on the evaluated model, saved to ``scratch / "model"`` (safetensors; ``scratch`` is a fresh
    temporary folder per evaluation)."""

    def __init__(self, model: torch.nn.Module, tokenizer, scratch: Path, *, dtype: str, seed: int):
        try:
            import vllm
        except ImportError:
            raise ImportError("evaluate.backend=vllm needs vLLM (a CUDA machine): pip install vllm; or use "
                              "evaluate.backend=hf") from None
        path = Path(scratch) / "model"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        self.vllm, self.tokenizer = vllm, tokenizer
        self.ends = sorted(_end_ids(tokenizer, model))
        self.llm = vllm.LLM(model=str(path), tokenizer=str(path), dtype=dtype, seed=seed)

    def generate(self, prompts: list[str], *, max_new_tokens: int, add_special_tokens: bool = True,
                 max_prompt_tokens: int | None = None, **_batching) -> Generation:
        encoded, truncated = encode_prompts(self.tokenizer, prompts, add_special_tokens, max_prompt_tokens)
        if not prompts:
            return Generation([], truncated, [], [], [])
        params = self.vllm.SamplingParams(temperature=0.0, n=1, max_tokens=max_new_tokens,
                                          stop_token_ids=self.ends, skip_special_tokens=True)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params)
        rows = [list(o.outputs[0].token_ids) for o in outputs]  # vLLM keeps the input order
        counts = [count_new_tokens(r, set(self.ends)) for r in rows]
        return Generation(safe_decode(self.tokenizer, rows), truncated, [len(e) for e in encoded], counts,
                          [r[:c] for r, c in zip(rows, counts)])


def make_backend(name: str, model: torch.nn.Module, tokenizer, scratch: Path, *, dtype: str, seed: int) -> Backend:
    if name == "vllm":
        return VLLMBackend(model, tokenizer, scratch, dtype=dtype, seed=seed)
    return HFBackend(model, tokenizer)
