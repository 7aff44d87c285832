from alignshield.data import Example
from alignshield.data.collate import IGNORE_INDEX, PadCollator, tokenize_pair
from alignshield.data.templates import render_prompt


def test_prompt_masked_answer_and_eos_are_labels(tokenizer):
    ex = Example("Say hi", "", "hello there")
    t = tokenize_pair(tokenizer, ex, "alpaca", max_length=128)
    prompt_len = len(tokenizer(render_prompt(ex, "alpaca")).input_ids)
    assert t.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert t.labels[prompt_len:] == t.input_ids[prompt_len:]
    assert t.input_ids[-1] == tokenizer.eos_token_id and t.labels[-1] == tokenizer.eos_token_id


def test_padding_masked_by_position_even_when_pad_is_eos(tokenizer):
    pad = tokenizer.eos_token_id  # as in SmolLM2: pad token == end token
    items = [tokenize_pair(tokenizer, Example("a", "", "b"), "alpaca", 128),
             tokenize_pair(tokenizer, Example("a longer prompt here", "", "b c d e"), "alpaca", 128)]
    batch = PadCollator(pad)(items)
    short = len(items[0].input_ids)
    assert batch["labels"][0, short - 1] == pad  # the real end token is still learned
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, short:] == 0).all() and batch["attention_mask"][0, :short].all()


def test_long_prompt_keeps_room_for_the_answer(tokenizer):
    ex = Example("word " * 400, "", "the answer")
    t = tokenize_pair(tokenizer, ex, "alpaca", max_length=64)
    assert len(t.input_ids) <= 64
    assert sum(label != IGNORE_INDEX for label in t.labels) == len(tokenizer("the answer").input_ids) + 1


def test_input_template_only_with_input():
    assert "### Input:" in render_prompt(Example("i", "x"), "alpaca")
    assert "### Input:" not in render_prompt(Example("i"), "alpaca")
    assert render_prompt(Example("i"), "alpaca").endswith("### Response:\n")
