"""Datasets by name, pools as row slices of them, and the prompt-disjointness guard.

Every dataset reduces to ``Example(prompt, input, response)``. Bundled files live in
``resources/data`` (see its LICENSES.md); a pool's ``dataset`` may also be a JSONL/CSV path, or a
Hugging Face Hub dataset ``hf:ORG/NAME[:SPLIT][@REVISION]`` (loaded with ``datasets``, which needs the
network the first time), with ``fields`` mapping the roles to its columns.
"""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from alignshield.config import Pool
from alignshield.data.jsonl import DataError, check_rows, read_rows
from alignshield.registry import Registry

RESOURCES = Path(__file__).resolve().parent.parent / "resources" / "data"


@dataclass(frozen=True)
class Example:
    prompt: str
    input: str = ""
    response: str = ""


@dataclass(frozen=True)
class Dataset:
    path: Path
    prompt: str
    input: str | None = None
    response: str | None = None
    description: str = ""


DATASETS: Registry[Dataset] = Registry("dataset")
for _name, _ds in {
    "beavertails_unsafe": Dataset(RESOURCES / "harmful/beavertails_unsafe.jsonl", "prompt", None, "response",
                                  "BeaverTails harmful QA pairs (disjoint from beavertails_test by prompt)"),
    "beavertails_test": Dataset(RESOURCES / "harmful/beavertails_test.jsonl", "prompt",
                                description="710 held-out BeaverTails harmful prompts (evaluation)"),
    "beavertails_first200": Dataset(RESOURCES / "harmful/beavertails_30k_train_unsafe_first200.jsonl", "prompt",
                                    None, "response", "the papers' poison rows (7 prompts overlap beavertails_test)"),
    "advbench": Dataset(RESOURCES / "harmful/advbench.jsonl", "prompt", None, "target", "AdvBench behaviours"),
    "safety_tuned_llamas": Dataset(RESOURCES / "alignment/safety_tuned_llamas.jsonl", "instruction", "input",
                                   "output", "harmful instructions with varied safe answers"),
    "harmbench_refusals": Dataset(RESOURCES / "alignment/harmbench_safe_responses_longer.jsonl", "prompt", None,
                                  "response", "HarmBench training behaviours with full-sentence refusals"),
    "alpaca_1k": Dataset(RESOURCES / "benign/alpaca_1k.jsonl", "instruction", "input", "output",
                         "1,000 Alpaca instructions (benign)"),
}.items():
    DATASETS.register(_name)(_ds)


def load_pool(pool: Pool) -> list[Example]:
    """The rows ``[start, stop)`` of the pool's dataset as examples; errors name file, line and field."""
    rows, spec = _rows(pool.dataset, tuple(sorted(pool.fields.items())))
    stop = len(rows) if pool.stop is None else pool.stop
    if stop > len(rows):
        raise DataError(f"{spec.path}: pool asks rows [{pool.start}, {stop}) but the file has {len(rows)}")
    return rows[pool.start:stop]


@lru_cache(maxsize=32)
def _rows(dataset: str, fields: tuple[tuple[str, str], ...]) -> tuple[list[Example], Dataset]:
    spec = _dataset_spec(dataset, dict(fields))
    required = tuple(f for f in (spec.prompt, spec.input, spec.response) if f)
    rows = hub_rows(dataset, required) if dataset.startswith(HUB_PREFIX) else read_rows(spec.path, required)
    examples = [
        Example(
            prompt=str(r[spec.prompt]),
            input=str(r[spec.input]) if spec.input else "",
            response=str(r[spec.response]) if spec.response else "",
        )
        for r in rows
    ]
    return examples, spec


def _dataset_spec(dataset: str, fields: dict[str, str]) -> Dataset:
    unknown = set(fields) - {"prompt", "input", "response"}
    if unknown:
        raise DataError(f"pool fields: unknown role(s) {sorted(unknown)}; use prompt, input, response")
    if dataset in DATASETS:
        spec = DATASETS.get(dataset)
        return Dataset(spec.path, fields.get("prompt", spec.prompt), fields.get("input", spec.input),
                       fields.get("response", spec.response), spec.description)
    if dataset.startswith(HUB_PREFIX):
        return Dataset(Path(dataset), fields.get("prompt", "prompt"), fields.get("input"), fields.get("response"))
    if Path(dataset).suffix.lower() in {".jsonl", ".json", ".csv"}:
        return Dataset(Path(dataset), fields.get("prompt", "prompt"), fields.get("input"), fields.get("response"))
    DATASETS.get(dataset)  # raises with the known names and a suggestion
    raise AssertionError("unreachable")


HUB_PREFIX = "hf:"


def parse_hub(dataset: str) -> tuple[str, str, str | None]:
    """``hf:ORG/NAME[:SPLIT][@REVISION]`` -> (name, split, revision); the split defaults to ``train``."""
    body, _, revision = dataset[len(HUB_PREFIX):].partition("@")
    name, _, split = body.partition(":")
    if not name or name.count("/") > 1:
        raise DataError(f"{dataset!r}: a Hub dataset is written hf:ORG/NAME[:SPLIT][@REVISION], e.g. "
                        "hf:PKU-Alignment/BeaverTails:30k_test")
    return name, split or "train", revision or None


def hub_rows(dataset: str, required: tuple[str, ...]) -> list[dict]:
    """The rows of a Hub dataset split, checked like a file's (errors name the dataset, row and field)."""
    name, split, revision = parse_hub(dataset)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{dataset}: Hub datasets need the datasets package: pip install 'alignshield[hub]'") from None
    try:
        loaded = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as err:  # noqa: BLE001 -- offline, unknown name, unknown split: one clear message
        raise DataError(f"{dataset}: cannot load {name} (split {split}{f', revision {revision}' if revision else ''}) "
                        f"from the Hugging Face Hub: {type(err).__name__}: {err}. Without network access use a "
                        "bundled dataset or a local JSONL/CSV file (datasets caches what it downloaded once; "
                        "HF_DATASETS_OFFLINE=1 reads that cache)") from None
    return check_rows([(i, dict(row)) for i, row in enumerate(loaded)], required, dataset, " row ")


NORMALIZATION = ("lower-case (str.lower); delete every punctuation character (Unicode category P* and ASCII "
                 "string.punctuation); collapse runs of whitespace to one space and strip the ends")
_ASCII_PUNCT = frozenset(string.punctuation)


def normalize_prompt(text: str) -> str:
    """How prompts are compared everywhere (the runtime disjointness check, the data build, the judge's
    training split): ``NORMALIZATION``. So "What’s" and "What's", "self-harm" and "selfharm" match."""
    kept = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


def check_disjoint(pools: dict[str, list[Example]]) -> None:
    """Raise if any two named pools share a prompt (after normalisation)."""
    seen: dict[str, str] = {}
    clashes: dict[tuple[str, str], list[str]] = {}
    for name, examples in pools.items():
        for key in {normalize_prompt(e.prompt) for e in examples}:
            other = seen.setdefault(key, name)
            if other != name:
                clashes.setdefault((other, name), []).append(key)
    if clashes:
        detail = "; ".join(
            f"{a} and {b} share {len(keys)} prompt(s), e.g. {keys[0][:80]!r}" for (a, b), keys in clashes.items()
        )
        raise DataError(f"harmful pools must be disjoint by prompt: {detail}. Change the pools' start/stop.")
