"""Bundled datasets, pools (slices of them), the fine-tune mixer and the prompt templates."""

from alignshield.data.jsonl import DataError, read_rows
from alignshield.data.pools import DATASETS, Example, check_disjoint, load_pool, normalize_prompt

__all__ = ["DATASETS", "DataError", "Example", "check_disjoint", "load_pool", "normalize_prompt", "read_rows"]
