"""Fine-tuning tasks as data: where the rows are, how a row becomes an instruction, how an answer is scored.

Each scorer returns named metrics in [0, 1]; the first one is the task's headline Finetune Accuracy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from alignshield.data.jsonl import read_rows
from alignshield.data.pools import RESOURCES, Example
from alignshield.registry import Registry


@dataclass(frozen=True)
class Task:
    name: str
    train_file: str
    test_file: str
    fields: tuple[str, ...]
    to_example: Callable[[dict], Example]
    score: Callable[[str, dict], dict[str, float]]
    max_new_tokens: int
    description: str

    def rows(self, split: str) -> list[dict]:
        return read_rows(RESOURCES / (self.train_file if split == "train" else self.test_file), self.fields)

    def examples(self, split: str) -> list[Example]:
        return [self.to_example(r) for r in self.rows(split)]


TASKS: Registry[Task] = Registry("task")

# ------------------------------------------------------------------ SST-2

# Instruction texts and label words are the reference repositories' (Vaccine, T-Vaccine, Antidote).
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"


def score_label(answer: str, label: str, labels: tuple[str, ...]) -> dict[str, float]:
    """strict: the answer is exactly the label word (case and a final full stop aside), as Antidote
    scores. lenient: the gold label word occurs in the answer and no other label does (Vaccine and
    T-Vaccine count any occurrence of the gold word, even beside the other label; we do not)."""
    text = answer.strip().rstrip(".").strip().lower()
    gold = label.lower()
    present = {lab.lower() for lab in labels if re.search(rf"(?<!\w){re.escape(lab.lower())}(?!\w)", text)}
    return {"strict": float(text == gold), "lenient": float(present == {gold})}


TASKS.register("sst2")(Task(
    name="sst2",
    train_file="benign/sst2_train.jsonl",
    test_file="benign/sst2_test.jsonl",
    fields=("sentence", "label"),
    to_example=lambda r: Example(SST2_INSTRUCTION, r["sentence"].strip(), r["label"]),
    score=lambda a, r: score_label(a, r["label"], ("positive", "negative")),
    max_new_tokens=4,
    description="SST-2 sentiment (positive / negative)",
))

# ------------------------------------------------------------------ AG News

AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    + "\n".join(AGNEWS_LABELS) + "\n"
)

TASKS.register("agnews")(Task(
    name="agnews",
    train_file="benign/agnews_train.jsonl",
    test_file="benign/agnews_test.jsonl",
    fields=("text", "label"),
    to_example=lambda r: Example(AGNEWS_INSTRUCTION, r["text"].strip(), r["label"]),
    score=lambda a, r: score_label(a, r["label"], AGNEWS_LABELS),
    max_new_tokens=6,
    description="AG News topic (World / Sports / Business / Sci/Tech)",
))

# ------------------------------------------------------------------ GSM8K

GSM8K_SUFFIX = "\nFirst think step by step and then answer the final number.\n"
GSM8K_FINAL = "The final answer is: "
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    """The first number after the last final-answer marker ('####' or 'The final answer is:'),
    else the last number in the text. Thousands separators are ignored."""
    text = text.replace(",", "")
    marker = max(text.rfind("####"), text.rfind(GSM8K_FINAL.strip()))
    if marker >= 0:
        after = _NUMBER.findall(text[marker:])
        if after:
            return float(after[0])
    found = _NUMBER.findall(text)
    return float(found[-1]) if found else None


def score_gsm8k(answer: str, row: dict) -> dict[str, float]:
    gold, pred = parse_number(row["answer"]), parse_number(answer)
    return {"accuracy": float(pred is not None and gold is not None and abs(pred - gold) < 1e-6)}


TASKS.register("gsm8k")(Task(
    name="gsm8k",
    train_file="benign/gsm8k_train.jsonl",
    test_file="benign/gsm8k_test.jsonl",
    fields=("question", "answer"),
    to_example=lambda r: Example(r["question"].strip() + GSM8K_SUFFIX, "",
                                 r["answer"].strip().replace("####", GSM8K_FINAL)),
    score=score_gsm8k,
    max_new_tokens=200,
    description="GSM8K grade-school maths (final number)",
))

# ------------------------------------------------------------------ Alpaca / AlpacaEval


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence)."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


TASKS.register("alpaca")(Task(
    name="alpaca",
    train_file="benign/alpaca_1k.jsonl",
    test_file="benign/alpacaeval.jsonl",
    fields=("instruction", "output"),
    to_example=lambda r: Example(r["instruction"].strip(), str(r.get("input", "")).strip(), r["output"].strip()),
    score=lambda a, r: {"rouge_l_proxy": rouge_l(a, r["output"])},
    max_new_tokens=128,
    description="Alpaca (train) / AlpacaEval (test). Score: ROUGE-L vs the GPT-4 reference, a proxy, "
                "not AlpacaEval's GPT-4 win rate",
))
