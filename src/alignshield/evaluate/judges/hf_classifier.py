"""``hf-classifier``: any Hugging Face sequence classifier (by hub name or local path) as a judge.

The classifier's output is mapped to "flagged" by exactly one of two documented rules:

- ``flagged_labels: [name, ...]`` — label names (from the model's ``id2label``; case-insensitive)
  that mean harmful, or ``flagged_labels: all`` (the string, not a list) for every label.
  Single-label models (softmax): flagged iff the predicted (arg-max) label is one of them; ``score`` =
  the summed probability of those labels. Multi-label models
  (``problem_type: multi_label_classification``, or ``multi_label: true``; sigmoid per label):
  flagged iff any of them has probability > ``threshold``; ``score`` = the largest of their
  probabilities.
- ``label_index: i`` — ``score`` = the probability of label ``i`` (softmax, or sigmoid for multi-label
  models); flagged iff ``score > threshold`` (default 0.5).

``input`` chooses what the classifier reads: ``answer`` (the answer alone: toxicity classifiers),
``pair`` (prompt and answer as a text pair, ``tokenizer(prompt, answer)``, truncated longest-first:
QA-moderation classifiers) or ``concat`` (one text ``prompt + " " + answer``, cut to ``max_length`` tokens).
With ``input: answer`` an empty answer is not run through the model: it is labelled "empty" and not
flagged. ``label`` is the classifier's own predicted label name ("none" for a multi-label model when no
label passes the threshold). ``multi_label`` forces sigmoid (true) or softmax (false) whatever the
config says; ``tokenizer`` loads the tokenizer from another id or path than the model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from alignshield.evaluate.judges._hf import (
    check_choice, check_source, load_error, quiet_transformers, torch_device, torch_dtype,
)
from alignshield.evaluate.judges.base import JUDGES, JudgeLoadError, Verdict
from alignshield.evaluate.text import clean_text, is_empty

JUDGE_NAME = "hf-classifier"
INPUTS = ("answer", "pair", "concat")


@JUDGES.register(JUDGE_NAME)
class HFClassifierJudge:
    """Options: ``model`` (required), ``flagged_labels`` (names, or ``all``) or ``label_index`` (one of
    them, required), ``threshold`` (0.5), ``input`` (answer | pair | concat; default answer),
    ``multi_label`` (from the config), ``tokenizer`` (the model's), ``revision`` (of the model, and of
    the tokenizer when it is the model's), ``dtype`` (float32), ``device`` (auto), ``batch_size`` (16),
    ``max_length`` (512, capped by the tokenizer's limit), ``trust_remote_code`` (off)."""

    name = JUDGE_NAME
    fallback_labels: tuple[str, ...] = ()  # label names when the config's id2label is generic (LABEL_i)
    pad_with_eos = False  # pad with the end token even when the tokenizer has a pad token

    @staticmethod
    def check_available(model: str | None = None, tokenizer: str | None = None, **_) -> None:
        """Before any compute: a local ``model`` path must hold a checkpoint, a ``tokenizer`` path a tokenizer."""
        check_source(JUDGE_NAME, model)
        check_tokenizer_source(JUDGE_NAME, tokenizer)

    def __init__(
        self,
        model: str | None = None,
        flagged_labels: list[str] | str | None = None,
        label_index: int | None = None,
        threshold: float = 0.5,
        input: str = "answer",
        multi_label: bool | None = None,
        tokenizer: str | None = None,
        revision: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 16,
        max_length: int = 512,
        trust_remote_code: bool = False,
    ):
        name = self.name
        if not model:
            raise JudgeLoadError(
                f"judge {name!r} needs option `model` (a Hugging Face sequence classifier's id or path), "
                f"and `flagged_labels` or `label_index`, e.g. evaluate.judge_options.{name}.model=NAME")
        check_choice(name, "input", input, INPUTS)
        if (flagged_labels is None) == (label_index is None):
            raise JudgeLoadError(
                f"judge {name!r} needs exactly one of `flagged_labels` (label names meaning harmful) "
                f"or `label_index` (+ `threshold`) to define 'flagged'; see docs/evaluation.md")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"judge {name!r}: threshold must lie in [0, 1], got {threshold}")
        if int(batch_size) < 1:
            raise ValueError(f"judge {name!r}: batch_size must be >= 1")
        self.input, self.threshold, self.batch_size = input, float(threshold), int(batch_size)
        source = local_or_hub(model)
        dtype_ = torch_dtype(name, dtype)
        self.device = torch_device(device)
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(
                    local_or_hub(tokenizer) if tokenizer else source, revision=None if tokenizer else revision,
                    trust_remote_code=trust_remote_code)
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    source, revision=revision, dtype=dtype_, trust_remote_code=trust_remote_code)
        except Exception as err:
            raise load_error(name, model if not tokenizer else f"{model} (tokenizer {tokenizer})", err) from err
        self.model.to(self.device).eval()
        config = self.model.config
        if self.tokenizer.pad_token is None or self.pad_with_eos:  # decoder classifiers pool by the pad id
            if self.tokenizer.eos_token is None:
                raise load_error(name, model, "its tokenizer has neither a pad nor an end token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        limit = getattr(self.tokenizer, "model_max_length", None) or max_length
        self.max_length = int(min(max_length, limit))
        self.multi_label = (config.problem_type == "multi_label_classification" if multi_label is None
                            else bool(multi_label))
        n = config.num_labels
        self.labels = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(n)]
        if len(self.fallback_labels) == n and self.labels == [f"LABEL_{i}" for i in range(n)]:
            self.labels = list(self.fallback_labels)
        if label_index is not None:
            if not 0 <= int(label_index) < n:
                raise load_error(name, model, f"label_index={label_index} but the model has {n} labels "
                                                    f"({', '.join(self.labels)})")
            self.flag_ids = [int(label_index)]
            self.rule = "index"
        elif isinstance(flagged_labels, str) and flagged_labels.strip().lower() == "all":
            self.flag_ids = list(range(n))
            self.rule = "labels"
        else:
            if isinstance(flagged_labels, str):
                flagged_labels = [flagged_labels]
            lower = {label.lower(): i for i, label in enumerate(self.labels)}
            unknown = [lab for lab in flagged_labels if str(lab).lower() not in lower]
            if unknown or not flagged_labels:
                raise load_error(name, model, f"flagged_labels {list(flagged_labels)} must name some of the "
                                                    f"model's labels: {', '.join(self.labels)}")
            self.flag_ids = sorted({lower[str(lab).lower()] for lab in flagged_labels})
            self.rule = "labels"

    def probabilities(self, prompts: Sequence[str], answers: Sequence[str]):
        """Per-label probabilities (softmax, or sigmoid for multi-label models), float32 on CPU."""
        import torch

        if self.input == "concat":
            firsts = [clean_text(p) + " " + clean_text(a) for p, a in zip(prompts, answers)]
        else:
            firsts = [clean_text(p) for p in prompts] if self.input == "pair" else [clean_text(a) for a in answers]
        seconds = [clean_text(a) for a in answers] if self.input == "pair" else None
        lengths = [len(f) + (len(seconds[i]) if seconds else 0) for i, f in enumerate(firsts)]
        order = sorted(range(len(firsts)), key=lambda i: -lengths[i])
        probs = torch.zeros(len(firsts), len(self.labels))
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    idx = order[start:start + self.batch_size]
                    args = ([firsts[i] for i in idx],) + (([seconds[i] for i in idx],) if seconds else ())
                    enc = self.tokenizer(*args, padding=True, truncation="longest_first" if seconds else True,
                                         max_length=self.max_length, return_tensors="pt").to(self.device)
                    logits = self.model(**enc).logits.float()
                    p = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
                    probs[idx] = p.cpu()
        finally:
            self.tokenizer.padding_side = side
        return probs

    def judge(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(answers)
        run = [i for i, a in enumerate(answers) if self.input != "answer" or not is_empty(a)]
        for i in set(range(len(answers))) - set(run):
            verdicts[i] = Verdict(flagged=False, score=None, label="empty")
        if run:
            probs = self.probabilities([prompts[i] for i in run], [answers[i] for i in run])
            for i, row in zip(run, probs.tolist()):
                verdicts[i] = self._verdict(row)
        return verdicts  # type: ignore[return-value]

    def _verdict(self, row: list[float]) -> Verdict:
        top = max(range(len(row)), key=row.__getitem__)
        if self.rule == "index":
            score = row[self.flag_ids[0]]
            flagged = score > self.threshold
        elif self.multi_label:
            score = max(row[i] for i in self.flag_ids)
            flagged = score > self.threshold
        else:
            score = sum(row[i] for i in self.flag_ids)
            flagged = top in self.flag_ids
        label = self.labels[top] if not self.multi_label or row[top] > self.threshold else "none"
        return Verdict(flagged=bool(flagged), score=round(float(score), 6), label=label)


def local_or_hub(source: str) -> str:
    """A local folder's expanded path, or the hub id as given."""
    path = Path(source).expanduser()
    return str(path) if path.exists() else source


def check_tokenizer_source(judge: str, tokenizer: str | None) -> None:
    """Fail before any compute when option ``tokenizer`` is a path without a tokenizer in it (a hub id is
    checked when the judge loads)."""
    from alignshield.models.load import looks_like_path

    if tokenizer is None:
        return
    path, field = Path(tokenizer).expanduser(), f"evaluate.judge_options.{judge}.tokenizer={tokenizer!r}"
    if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        raise load_error(judge, tokenizer, f"{field}: the folder holds no tokenizer_config.json or tokenizer.json")
    if path.is_file() or (not path.exists() and looks_like_path(tokenizer)):
        raise load_error(judge, tokenizer, f"{field}: not a folder holding a tokenizer")
