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
    assert sum(sizes) < 24 * 1024 * 1024


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
    mod = _builder()
    assert mod.main(["--shared", str(SHARED), "--out", str(tmp_path), "--quiet"]) == 0
    shipped = _sha_tree(DATA)
    rebuilt = _sha_tree(tmp_path)
    assert rebuilt == shipped
    # Idempotent: a second run changes nothing.
    assert mod.main(["--shared", str(SHARED), "--out", str(tmp_path), "--quiet"]) == 0
    assert _sha_tree(tmp_path) == rebuilt


# --------------------------------------------------------------------------
# Files written by the alignshield authors (canonical copy in tools/data/)

AUTHORED_DIR = REPO / "tools" / "data"
REWRITES = "judge/instruction_rewrites.jsonl"
GOLD = "judge/gold_answers.jsonl"


def _builder():
    spec = importlib.util.spec_from_file_location("build_resources", BUILDER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _authored_entries() -> dict[str, dict]:
    return {n: e for n, e in _manifest()["files"].items()
            if e["source"].startswith("alignshield (authored): ")}


def test_authored_files_name_their_licence():
    entries = _authored_entries()
    assert set(entries) == {REWRITES, GOLD}
    licenses_md = (DATA / "LICENSES.md").read_text(encoding="utf-8")
    upstream = {REWRITES: {"BeaverTails"},
                GOLD: {"BeaverTails", "AdvBench", "Safety-Tuned LLaMAs", "HarmBench"}}
    for name, e in entries.items():
        assert e["licence"] == "CC BY-NC 4.0", name
        assert "CC BY-NC 4.0" in e["licence_basis"], name
        assert e["source"] != "alignshield (authored): ", name
        names = {u["name"] for u in e["upstream"]}
        assert upstream[name] <= names, name
        assert all(u["licence"] for u in e["upstream"]), name
        # Shipped copy is the canonical tools/data copy, byte for byte.
        assert e["authored_file"] == f"tools/data/{name}"
        assert (DATA / name).read_bytes() == (AUTHORED_DIR / name).read_bytes(), name
        assert f"### `{name}`" in licenses_md and f"| `{name}` |" in licenses_md, name
    gold_inputs = {u["name"]: u["licence"] for u in entries[GOLD]["upstream"]}
    assert gold_inputs["AdvBench"] == gold_inputs["HarmBench"] == "MIT"
    assert any(n.startswith("SmolLM2-135M-Instruct") and lic == "Apache-2.0"
               for n, lic in gold_inputs.items())
    # The content warning still covers every folder with an authored file.
    warning = _manifest()["content_warning"]
    assert all(name.split("/")[0] + "/" in warning for name in entries)


def test_gold_answers_parts_share_no_prompt():
    from alignshield.data.pools import normalize_prompt

    rows = _rows(DATA / GOLD)
    parts: dict[str, set[str]] = {}
    for row in rows:
        parts.setdefault(row["part"], set()).add(normalize_prompt(row["prompt"]))
    assert set(parts) == {"train", "test"}
    shared = parts["train"] & parts["test"]
    assert not shared, f"{len(shared)} normalized prompt(s) in both parts, e.g. {sorted(shared)[0]!r}"
    assert _manifest()["files"][GOLD]["parts"] == {
        p: sum(r["part"] == p for r in rows) for p in dict.fromkeys(r["part"] for r in rows)}


@pytest.mark.skipif(not (SHARED / "README.md").is_file(), reason="../shared/data not present")
@pytest.mark.parametrize("line, message", [
    ('{"row": 1, "prompt": "p", "form": "list"}', "line 2: fields"),
    ('{"row": 1, "prompt": "p", "form": "list", "instruction": "i"}', "line 2: fields"),
    ('["row", "prompt", "instruction", "form"]', "line 2: a JSON list, not an object"),
    ('{"row": 1, "prompt": "p",', "line 2: not valid JSON"),
    ('', "line 2: blank line"),
])
def test_builder_rejects_bad_authored_rows(tmp_path, line, message):
    mod = _builder()
    authored = tmp_path / "authored"
    for name in (REWRITES, GOLD):
        (authored / name).parent.mkdir(parents=True, exist_ok=True)
        (authored / name).write_bytes((AUTHORED_DIR / name).read_bytes())
    good = (AUTHORED_DIR / REWRITES).read_text(encoding="utf-8").split("\n")
    (authored / REWRITES).write_text("\n".join([good[0], line, *good[1:]]), encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        mod.build(SHARED, tmp_path / "out", quiet=True, authored=authored)
    assert REWRITES in str(exc.value) and message in str(exc.value)
    assert not (tmp_path / "out").exists()
