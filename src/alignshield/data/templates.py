"""Prompt templates. One template renders both training and evaluation prompts, so they cannot drift."""

from __future__ import annotations

from alignshield.data.pools import Example

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n"
)


def render_prompt(example: Example, template: str, tokenizer=None) -> str:
    """The text the model sees before its answer."""
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if example.input else ALPACA_NO_INPUT).format(
            prompt=example.prompt, input=example.input
        )
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template; use template=alpaca")
        content = f"{example.prompt}\n\n{example.input}" if example.input else example.prompt
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown template {template!r}; known: alpaca, chat")
