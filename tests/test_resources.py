"""Checks on the data subsets shipped in src/alignshield/resources/data/."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import string
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "src" / "alignshield" / "resources" / "data"
SHARED = REPO.parent / "shared" / "data"
BUILDER = REPO / "tools" / "build_resources.py"

UNSAFE = "harmful/beavertails_unsafe.jsonl"
TEST = "harmful/beavertails_test.jsonl"


def _manifest() -> dict:
    return json.loads((DATA / "MANIFEST.json").read_text(encoding="utf-8"))


def _rows(path: Path) -> list[dict]:
    text = path.read_bytes().decode("utf-8")  # strict UTF-8
    assert text.endswith("\n"), f"{path.name}: missing final newline"
    return [json.loads(line) for line in text.split("\n")[:-1]]


_PUNCT = frozenset(string.punctuation)


def _norm(text: str) -> str:
    # Independent restatement of the builder's rule: lower-case, delete
    # punctuation (Unicode P* and ASCII), collapse whitespace.
    text = "".join(c for c in text.lower()
                   if c not in _PUNCT and not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def _sha_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


MANIFEST_FILES = sorted(_manifest()["files"]) if (DATA / "MANIFEST.json").is_file() else []


def test_manifest_lists_every_data_file():
    on_disk = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*.jsonl")}
    assert on_disk == set(MANIFEST_FILES)
    assert (DATA / "LICENSES.md").is_file()
    sizes = [(DATA / n).stat().st_size for n in MANIFEST_FILES]
    assert max(sizes) < 5 * 1024 * 1024
    assert sum(sizes) < 20 * 1024 * 1024


@pytest.mark.parametrize("name", MANIFEST_FILES)
def test_file_matches_manifest(name):
    entry = _manifest()["files"][name]
    data = (DATA / name).read_bytes()
    assert len(data) == entry["bytes"]
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    rows = _rows(DATA / name)
    assert len(rows) == entry["rows"]
    for i, row in enumerate(rows, 1):
        assert isinstance(row, dict) and list(row) == entry["fields"], f"{name}:{i}"
    for key in ("source", "licence", "transformation"):
        assert entry[key], f"{name}: empty {key}"


def test_beavertails_unsafe_disjoint_and_unique():
    test_prompts = {_norm(r["prompt"]) for r in _rows(DATA / TEST)}
    unsafe = [_norm(r["prompt"]) for r in _rows(DATA / UNSAFE)]
    assert not set(unsafe) & test_prompts
    assert len(unsafe) == len(set(unsafe))
    removed = _manifest()["files"][UNSAFE]["removed"]
    assert len(unsafe) + removed["test_overlap"] + removed["duplicate_prompt"] == \
        _manifest()["files"][UNSAFE]["source_rows"]


def test_alignment_prompts_disjoint_from_test():
    test_prompts = {_norm(r["prompt"]) for r in _rows(DATA / TEST)}
    for name, field in [("alignment/safety_tuned_llamas.jsonl", "instruction"),
                        ("alignment/harmbench_safe_responses_longer.jsonl", "prompt")]:
        assert not {_norm(r[field]) for r in _rows(DATA / name)} & test_prompts, name


def test_agnews_test_is_class_balanced():
    labels = [r["label"] for r in _rows(DATA / "benign/agnews_test.jsonl")]
    assert len(labels) == 2000
    assert {lab: labels.count(lab) for lab in set(labels)} == {
        "World": 500, "Sports": 500, "Business": 500, "Sci/Tech": 500}


@pytest.mark.skipif(not (SHARED / "README.md").is_file(), reason="../shared/data not present")
def test_builder_reproduces_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("build_resources", BUILDER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shared", str(SHARED), "--out", str(tmp_path), "--quiet"]) == 0
    shipped = _sha_tree(DATA)
    rebuilt = _sha_tree(tmp_path)
    assert rebuilt == shipped
    # Idempotent: a second run changes nothing.
    assert mod.main(["--shared", str(SHARED), "--out", str(tmp_path), "--quiet"]) == 0
    assert _sha_tree(tmp_path) == rebuilt
