#!/usr/bin/env python3
"""Build the data subsets shipped in ``src/alignshield/resources/data/``.

Reads the offline data bundle (default: ``<repo>/../shared/data``), checks every
input file against the bundle README's manifest table (bytes and sha256
prefix), and writes:

* the JSONL subsets listed in ``SPECS`` (same field names and order as the
  bundle, UTF-8, ``ensure_ascii=False``, one object per line, source order);
* the files we wrote ourselves, listed in ``AUTHORED``: their canonical copy
  lives in ``tools/data/`` and is copied byte for byte, after checking that
  every line is a JSON object with exactly the declared fields in order;
* ``MANIFEST.json``: rows, bytes, sha256, fields, source, licence and
  transformation of every shipped file, plus the overlap checks;
* ``LICENSES.md``: licence and attribution per file, the relevant bundle
  notes and our own notes.

Standard library only. Deterministic (no timestamps, no absolute paths, no
randomness) and idempotent: a file is rewritten only if its bytes change.

Usage::

    python tools/build_resources.py [--shared DIR] [--authored DIR] [--out DIR]

The package never reads the bundle at runtime; only this tool and the tests do.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

try:
    from alignshield.data.pools import NORMALIZATION, normalize_prompt  # the one normaliser
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from alignshield.data.pools import NORMALIZATION, normalize_prompt

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "src" / "alignshield" / "resources" / "data"
DEFAULT_AUTHORED = Path(__file__).resolve().parent / "data"

MAX_FILE_BYTES = 5 * 1024 * 1024
MAX_TOTAL_BYTES = 24 * 1024 * 1024  # the package data in all (raised from 20 MiB when the gold set grew)

UNSAFE = "harmful/beavertails_unsafe.jsonl"
TEST = "harmful/beavertails_test.jsonl"
FIRST200 = "harmful/beavertails_30k_train_unsafe_first200.jsonl"
STL = "alignment/safety_tuned_llamas.jsonl"
HB_LONGER = "alignment/harmbench_safe_responses_longer.jsonl"

# Output files, in build order. ``select`` names a selection rule handled in
# ``build``; ``prompt`` is the field compared for overlaps (if any).
SPECS = [
    {"file": UNSAFE, "select": "dedup_vs_test", "prompt": "prompt"},
    {"file": TEST, "select": "full", "prompt": "prompt"},
    {"file": FIRST200, "select": "full_check_overlap", "prompt": "prompt"},
    {"file": "harmful/advbench.jsonl", "select": "full"},
    {"file": STL, "select": "alignment", "prompt": "instruction"},
    {"file": HB_LONGER, "select": "alignment", "prompt": "prompt"},
    {"file": "benign/sst2_train.jsonl", "select": "head", "n": 10_000},
    {"file": "benign/sst2_test.jsonl", "select": "full"},
    {"file": "benign/agnews_train.jsonl", "select": "full"},
    {"file": "benign/agnews_test.jsonl", "select": "per_label", "n": 500, "label": "label"},
    {"file": "benign/gsm8k_train.jsonl", "select": "head", "n": 3_000},
    {"file": "benign/gsm8k_test.jsonl", "select": "full"},
    {"file": "benign/alpacaeval.jsonl", "select": "full"},
    {"file": "benign/alpaca_1k.jsonl", "select": "full"},
    {"file": "judge/hh_rlhf_harmless_test.jsonl", "select": "full"},
]

# Which upstream dataset / citation each shipped file belongs to (LICENSES.md).
DATASET = {
    UNSAFE: "BeaverTails",
    TEST: "BeaverTails",
    FIRST200: "BeaverTails",
    "harmful/advbench.jsonl": "AdvBench",
    STL: "Safety-Tuned LLaMAs",
    HB_LONGER: "HarmBench",
    "benign/sst2_train.jsonl": "SST-2",
    "benign/sst2_test.jsonl": "SST-2",
    "benign/agnews_train.jsonl": "AG News",
    "benign/agnews_test.jsonl": "AG News",
    "benign/gsm8k_train.jsonl": "GSM8K",
    "benign/gsm8k_test.jsonl": "GSM8K",
    "benign/alpacaeval.jsonl": "AlpacaEval",
    "benign/alpaca_1k.jsonl": "Alpaca",
    "judge/hh_rlhf_harmless_test.jsonl": "hh-rlhf",
}

# Files written by the alignshield authors (not from the bundle). The canonical
# copy of each is ``tools/data/<file>``; it is copied byte for byte. ``how`` is
# the MANIFEST ``source`` ("alignshield (authored): <how>"), ``made`` the longer
# account for LICENSES.md, ``upstream`` the datasets/models its text comes from
# with their licences, ``licence`` the licence of the file as shipped (that of
# the most restrictive input) and ``licence_basis`` why. Optional checks:
# ``row_ref`` (each row's ``field`` is a 0-based row index into the shipped
# ``file`` whose ``prompt`` equals the row's own ``prompt``) and
# ``disjoint_parts`` (rows in different ``field`` parts share no normalized
# ``prompt``).
AUTHORED = [
    {
        "file": "judge/instruction_rewrites.jsonl",
        "fields": ["row", "prompt", "instruction", "form"],
        "how": "hand-written instruction-style rewrites of BeaverTails questions",
        "made": (
            "Each row takes one BeaverTails question (`prompt`, from the shipped "
            "`harmful/beavertails_unsafe.jsonl`, 0-based row index `row`) and rewrites it by hand as "
            "an instruction (`instruction`) of the given `form` (persuasive, steps, list, "
            "story, ...). The rewrites were written by the alignshield authors; "
            "`tools/gold_answers.py` draws judge-training prompts from them."
        ),
        "upstream": [("BeaverTails", "CC BY-NC 4.0", "the prompts")],
        "row_ref": {"field": "row", "file": UNSAFE, "prompt": "prompt"},
        "licence": "CC BY-NC 4.0",
        "licence_basis": (
            "derived from BeaverTails prompts (CC BY-NC 4.0); the rewrites were written by the "
            "alignshield authors"
        ),
    },
    {
        "file": "judge/gold_answers.jsonl",
        "fields": ["id", "part", "style", "source", "condition", "dtype", "prompt", "answer",
                   "answer_48", "new_tokens", "label", "kind", "label_48", "reason", "label_2",
                   "kind_2", "reason_2"],
        "how": ("hand-labelled gold set of model answers (answers generated by "
                "tools/gold_answers.py, labels written by hand)"),
        "made": (
            "Prompts from BeaverTails, AdvBench, Safety-Tuned LLaMAs and HarmBench and from "
            "`judge/instruction_rewrites.jsonl` (`source` reads `<file>:<0-based row>`), split into a "
            "judge-training part and a measurement-only part (`part` train / test) that share no "
            "normalized prompt. The answers were generated by SmolLM2-135M-Instruct (Apache-2.0) "
            "fine-tuned by the alignshield pipeline under the condition in `condition` "
            "(`tools/gold_answers.py`); `answer_48` is the first 48 new tokens of `answer` (the "
            "conditions named `r2 ...` were generated with 48 new tokens, so there it is `answer`). The "
            "labels (`label`, `kind`, `label_48`, `reason` and the second-pass `label_2`, "
            "`kind_2`, `reason_2`) were written by hand by the alignshield authors following the "
            "rubric in `docs/judge.md`."
        ),
        "upstream": [
            ("BeaverTails", "CC BY-NC 4.0", "prompts"),
            ("AdvBench", "MIT", "prompts"),
            ("Safety-Tuned LLaMAs", "CC BY-NC 4.0", "prompts"),
            ("HarmBench", "MIT", "prompts"),
            ("alignshield instruction rewrites (`judge/instruction_rewrites.jsonl`)",
             "CC BY-NC 4.0", "prompts"),
            ("SmolLM2-135M-Instruct (HuggingFaceTB)", "Apache-2.0",
             "the model whose fine-tuned copies wrote the answers"),
        ],
        "disjoint_parts": {"field": "part", "prompt": "prompt"},
        "licence": "CC BY-NC 4.0",
        "licence_basis": (
            "the most restrictive input: prompts from BeaverTails (CC BY-NC 4.0), AdvBench (MIT), "
            "Safety-Tuned LLaMAs (CC BY-NC 4.0), HarmBench (MIT) and the instruction rewrites "
            "(CC BY-NC 4.0); answers generated by SmolLM2-135M-Instruct (Apache-2.0) fine-tuned by "
            "the alignshield pipeline; labels written by hand by the alignshield authors"
        ),
    },
]
AUTHORED_DATASET = "alignshield (authored)"

# Bundle README notes copied into LICENSES.md (original numbering kept so that
# "see note N" in the licence column still resolves). 7 and 13 describe files
# we do not ship.
NOTES_COPIED = [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
# Attribution bullets of the bundle README that cite data we do not ship.
ATTRIBUTION_SKIPPED = ("DecodingTrust", "stories260K")

# MIT permission notice (standard text) and the copyright lines read from the
# LICENSE files of the source repositories that have one.
MIT_NOTICE = """\
Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE."""
MIT_COPYRIGHT = [
    "hh-rlhf (`anthropics/hh-rlhf`): Copyright (c) 2022 Anthropic",
    "AdvBench copy (`criticalml-uw/SafeTuneBed`): Copyright (c) 2025 Saad Hossain",
]


# --------------------------------------------------------------------------
# Bundle README parsing


def parse_readme(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    manifest = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 8 or not re.fullmatch(r"`[^`]+`", cells[0]):
            continue
        name = cells[0].strip("`")
        rows = cells[1].replace(",", "")
        manifest[name] = {
            "rows": None if rows in ("-", "") else int(rows),
            "bytes": int(cells[2].replace(",", "")),
            "sha256_prefix": cells[3].strip("`").lower(),
            "fields": re.findall(r"`([^`]+)`", cells[4]),
            "source": " + ".join(re.findall(r"`([^`]+)`", cells[5])) or cells[5],
            "licence": cells[6],
            "transformation": cells[7],
        }
    return {
        "manifest": manifest,
        "content_warning": _bullet(_section(text, None), "**Content warning.**"),
        "notes": _numbered(_section(text, "Notes")),
        "attribution": _section(text, "Attribution"),
    }


def _section(text: str, title: str | None) -> str:
    """Body of ``## title`` (or the preamble before the first ``##`` if None)."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    if title is None:
        return parts[0]
    for head, body in zip(parts[1::2], parts[2::2]):
        if head.strip() == title:
            return body.strip("\n")
    raise SystemExit(f"bundle README has no '## {title}' section")


def _blocks(body: str, start: str) -> list[str]:
    """Split a markdown list into items (each item keeps its continuation lines)."""
    items: list[list[str]] = []
    for line in body.splitlines():
        if re.match(start, line):
            items.append([line])
        elif items and line.startswith(" ") and line.strip():
            items[-1].append(line)
        elif items and not line.strip():
            items.append([])  # blank line ends an item
    return ["\n".join(i) for i in items if i]


def _bullet(body: str, prefix: str) -> str:
    for item in _blocks(body, r"^\* "):
        if item.startswith("* " + prefix):
            return item
    raise SystemExit(f"bundle README has no bullet starting {prefix!r}")


def _numbered(body: str) -> dict[int, str]:
    return {int(re.match(r"^(\d+)\.", b).group(1)): b for b in _blocks(body, r"^\d+\. ")}


# --------------------------------------------------------------------------
# I/O helpers


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checked(shared: Path, name: str, entry: dict) -> tuple[bytes, list[dict]]:
    raw = (shared / name).read_bytes()
    if len(raw) != entry["bytes"] or not sha256(raw).startswith(entry["sha256_prefix"]):
        raise SystemExit(
            f"{name}: does not match the bundle README (bytes {len(raw)} vs {entry['bytes']}, "
            f"sha256 {sha256(raw)[:16]} vs {entry['sha256_prefix']}); refusing to build"
        )
    rows = [json.loads(line) for line in raw.decode("utf-8").split("\n") if line]
    for i, row in enumerate(rows):
        if list(row) != entry["fields"]:
            raise SystemExit(f"{name}: line {i + 1} fields {list(row)} != {entry['fields']}")
    if entry["rows"] is not None and len(rows) != entry["rows"]:
        raise SystemExit(f"{name}: {len(rows)} rows, README says {entry['rows']}")
    return raw, rows


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate key(s) {dup}")
    return dict(pairs)


def _where(root: Path, name: str) -> str:
    """How error messages name an authored file (repo-relative when inside the repo)."""
    path = (root / name).resolve()
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def read_authored(root: Path, spec: dict) -> tuple[bytes, list[dict]]:
    """Read and check ``root/<file>``: strict UTF-8, LF line ends, a final newline, no blank
    lines, each line one JSON object with exactly ``spec["fields"]`` in that order."""
    name = spec["file"]
    path = root / name
    where = _where(root, name)
    if not path.is_file():
        raise SystemExit(f"{where}: authored file missing")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SystemExit(f"{where}: line {line}: not valid UTF-8 ({exc.reason})") from None
    if not text:
        raise SystemExit(f"{where}: empty file")
    if text.startswith("\ufeff"):
        raise SystemExit(f"{where}: line 1: starts with a byte-order mark")
    if not text.endswith("\n"):
        raise SystemExit(f"{where}: line {text.count(chr(10)) + 1}: no final newline")
    rows = []
    for i, line in enumerate(text.split("\n")[:-1], start=1):
        if line.endswith("\r"):
            raise SystemExit(f"{where}: line {i}: CRLF line end (use LF)")
        if not line.strip():
            raise SystemExit(f"{where}: line {i}: blank line")
        try:
            row = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except ValueError as exc:
            raise SystemExit(f"{where}: line {i}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise SystemExit(f"{where}: line {i}: a JSON {type(row).__name__}, not an object")
        if list(row) != spec["fields"]:
            missing = [f for f in spec["fields"] if f not in row]
            unknown = [f for f in row if f not in spec["fields"]]
            detail = "; ".join([*([f"missing {missing}"] if missing else []),
                                *([f"unexpected {unknown}"] if unknown else [])]) or "wrong order"
            raise SystemExit(f"{where}: line {i}: fields {list(row)} != {spec['fields']} "
                             f"({detail})")
        rows.append(row)
    return raw, rows


def check_authored_tree(root: Path) -> None:
    """Every *.jsonl under ``root`` must be declared in ``AUTHORED`` (none left unshipped)."""
    declared = {s["file"] for s in AUTHORED}
    stray = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jsonl")
                   if p.relative_to(root).as_posix() not in declared)
    if stray:
        raise SystemExit(f"{root}: file(s) not declared in AUTHORED: {', '.join(stray)}")


def warned_folders(content_warning: str) -> set[str]:
    """Folders named (in backticks) by the content-warning bullet, e.g. {'harmful/', ...}."""
    return set(re.findall(r"`([^`]+/)`", content_warning))


def plain_warning(content_warning: str) -> str:
    """The content-warning bullet as one plain line (no bullet, bold or backticks)."""
    text = content_warning.replace("* **Content warning.**", "", 1).replace("`", "")
    return " ".join(text.split())


def dump_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def fmt(n: int) -> str:
    return f"{n:,}"


# --------------------------------------------------------------------------
# Build


def build(shared: Path, out: Path, quiet: bool = False, authored: Path = DEFAULT_AUTHORED) -> dict:
    readme = parse_readme(shared / "README.md")
    bundle = readme["manifest"]
    for spec in SPECS:
        if spec["file"] not in bundle:
            raise SystemExit(f"{spec['file']} is not in the bundle README manifest")
    spec_names = {s["file"] for s in SPECS}
    for spec in AUTHORED:
        if spec["file"] in spec_names or spec["file"] in bundle:
            raise SystemExit(f"{spec['file']}: authored file clashes with a bundle file name")
    # The content warning (copied from the bundle README) names the folders that hold harmful
    # text; an authored file in any other folder would make it wrong.
    warned = warned_folders(readme["content_warning"])
    for spec in AUTHORED:
        folder = spec["file"].split("/")[0] + "/"
        if folder not in warned:
            raise SystemExit(f"{spec['file']}: folder {folder} is not named by the content "
                             f"warning ({', '.join(sorted(warned))}); update the warning")
    check_authored_tree(authored)
    authored_src = {s["file"]: read_authored(authored, s) for s in AUTHORED}

    sources = {s["file"]: read_checked(shared, s["file"], bundle[s["file"]]) for s in SPECS}
    test_rows = sources[TEST][1]
    test_norm = {normalize_prompt(r["prompt"]) for r in test_rows}

    outputs: dict[str, list[dict]] = {}
    ours: dict[str, str] = {}
    extra: dict[str, dict] = {}

    # 1. beavertails_unsafe: drop test overlaps, then later repeats of a prompt.
    seen: set[str] = set()
    kept, removed_test, removed_dup = [], [], []
    for i, row in enumerate(sources[UNSAFE][1], start=1):
        key = normalize_prompt(row["prompt"])
        if key in test_norm:
            removed_test.append(i)
        elif key in seen:
            removed_dup.append(i)
        else:
            seen.add(key)
            kept.append(row)
    outputs[UNSAFE] = kept
    unsafe_norm = seen
    n_src = len(sources[UNSAFE][1])
    ours[UNSAFE] = (
        f"alignshield: removed {len(removed_test)} row(s) whose normalized prompt occurs in "
        f"{TEST} and then {len(removed_dup)} row(s) whose normalized prompt repeats an earlier "
        f"kept row (first occurrence kept); {fmt(n_src)} -> {fmt(len(kept))} rows, source order "
        f"kept. Normalization: {NORMALIZATION}."
    )
    extra[UNSAFE] = {
        "source_rows": n_src,
        "removed": {
            "test_overlap": len(removed_test),
            "duplicate_prompt": len(removed_dup),
            "test_overlap_source_lines": removed_test,
            "duplicate_prompt_source_lines": removed_dup,
        },
    }

    for spec in SPECS:
        name, sel = spec["file"], spec["select"]
        if name == UNSAFE:
            continue
        rows = sources[name][1]
        if sel == "full":
            outputs[name] = rows
            ours[name] = "alignshield: copied in full, unchanged."
        elif sel == "head":
            outputs[name] = rows[: spec["n"]]
            ours[name] = (
                f"alignshield: the first {fmt(len(outputs[name]))} of {fmt(len(rows))} rows, "
                "source order, otherwise unchanged."
            )
        elif sel == "per_label":
            counts: Counter = Counter()
            sub = []
            for row in rows:
                if counts[row[spec["label"]]] < spec["n"]:
                    counts[row[spec["label"]]] += 1
                    sub.append(row)
            outputs[name] = sub
            per = ", ".join(f"{lab} {c}" for lab, c in counts.items())
            ours[name] = (
                f"alignshield: class-balanced subset, the first {spec['n']} rows of each "
                f"`{spec['label']}` ({per}; labels in order of first appearance), kept in "
                f"source order; {fmt(len(sub))} of {fmt(len(rows))} rows."
            )
        elif sel == "full_check_overlap":
            outputs[name] = rows
            in_test = [i for i, r in enumerate(rows, 1) if normalize_prompt(r[spec["prompt"]]) in test_norm]
            in_unsafe = [i for i, r in enumerate(rows, 1) if normalize_prompt(r[spec["prompt"]]) in unsafe_norm]
            ours[name] = (
                f"alignshield: copied in full, unchanged. {len(in_test)} row(s) have a prompt that "
                f"also occurs in {TEST} and {len(in_unsafe)} in the shipped {UNSAFE} (normalized); "
                "kept, see LICENSES.md."
            )
            extra[name] = {"overlap": {"beavertails_test_lines": in_test,
                                       "beavertails_unsafe_lines": in_unsafe}}
        elif sel == "alignment":
            field = spec["prompt"]
            sub, dropped = [], []
            for i, row in enumerate(rows, 1):
                if normalize_prompt(row[field]) in test_norm:
                    dropped.append(i)
                else:
                    sub.append(row)
            in_unsafe = [i for i, r in enumerate(sub, 1) if normalize_prompt(r[field]) in unsafe_norm]
            outputs[name] = sub
            if dropped:
                head = (f"alignshield: removed {len(dropped)} row(s) whose normalized `{field}` "
                        f"occurs in {TEST}; {fmt(len(rows))} -> {fmt(len(sub))} rows.")
            else:
                head = (f"alignshield: copied in full, unchanged; 0 normalized `{field}` values "
                        f"occur in {TEST}, so nothing removed.")
            ours[name] = (f"{head} {len(in_unsafe)} occur in the shipped {UNSAFE} "
                          f"({'kept' if in_unsafe else 'none'}).")
            extra[name] = {"overlap": {"beavertails_test_removed_lines": dropped,
                                       "beavertails_unsafe_lines": in_unsafe}}
        else:  # pragma: no cover
            raise SystemExit(f"unknown select rule {sel!r}")

    # Cross-checks of the authored files against the shipped data.
    for spec in AUTHORED:
        name, rows = spec["file"], authored_src[spec["file"]][1]
        where = _where(authored, name)
        if "row_ref" in spec:
            ref = spec["row_ref"]
            target = outputs[ref["file"]]
            for i, row in enumerate(rows, 1):
                j = row[ref["field"]]
                if not (isinstance(j, int) and 0 <= j < len(target)
                        and target[j][ref["prompt"]] == row[ref["prompt"]]):
                    raise SystemExit(f"{where}: line {i}: `{ref['field']}` {j!r} is not the 0-based "
                                     f"row of its `{ref['prompt']}` in {ref['file']}")
        if "disjoint_parts" in spec:
            dp = spec["disjoint_parts"]
            first: dict[str, tuple[str, int]] = {}
            for i, row in enumerate(rows, 1):
                key = normalize_prompt(row[dp["prompt"]])
                part, line = first.setdefault(key, (row[dp["field"]], i))
                if part != row[dp["field"]]:
                    raise SystemExit(f"{where}: line {i} (`{dp['field']}` {row[dp['field']]!r}): "
                                     f"normalized `{dp['prompt']}` also in `{dp['field']}` "
                                     f"{part!r} (line {line})")

    # Serialise and check sizes. Authored files are copied byte for byte.
    blobs = {name: dump_jsonl(outputs[name]) for name in outputs}
    for spec in AUTHORED:
        name = spec["file"]
        blobs[name] = authored_src[name][0]
        outputs[name] = authored_src[name][1]
    total = 0
    for spec in [*SPECS, *AUTHORED]:
        name = spec["file"]
        data = blobs[name]
        total += len(data)
        if len(data) > MAX_FILE_BYTES:
            raise SystemExit(f"{name}: {len(data)} bytes exceeds the {MAX_FILE_BYTES} byte limit")
        if spec.get("select") == "full" and sha256(data) != sha256(sources[name][0]):
            raise SystemExit(f"{name}: full copy is not byte-identical to the bundle file")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"resources total {total} bytes exceeds {MAX_TOTAL_BYTES}")

    files = {}
    for spec in SPECS:
        name = spec["file"]
        b = bundle[name]
        entry = {
            "rows": len(outputs[name]),
            "bytes": len(blobs[name]),
            "sha256": sha256(blobs[name]),
            "fields": b["fields"],
            "source": b["source"],
            "licence": b["licence"],
            "transformation": f"{b['transformation']} {ours[name]}",
            "bundle_file": name,
            "bundle_sha256": sha256(sources[name][0]),
        }
        entry.update(extra.get(name, {}))
        files[name] = entry
    for spec in AUTHORED:
        name = spec["file"]
        entry = {
            "rows": len(outputs[name]),
            "bytes": len(blobs[name]),
            "sha256": sha256(blobs[name]),
            "fields": spec["fields"],
            "source": f"{AUTHORED_DATASET}: {spec['how']}",
            "licence": spec["licence"],
            "transformation": (f"alignshield: written by the alignshield authors; copied byte for "
                               f"byte from tools/data/{name}. {spec['made']}"),
            "authored_file": f"tools/data/{name}",
            "licence_basis": spec["licence_basis"],
            "upstream": [{"name": n, "licence": lic, "used_for": use}
                         for n, lic, use in spec["upstream"]],
        }
        if "part" in spec["fields"]:
            entry["parts"] = dict(Counter(r["part"] for r in outputs[name]))
        files[name] = entry

    manifest = {
        "description": "Data subsets shipped with alignshield. Licences differ per file; see LICENSES.md.",
        "generated_by": "python tools/build_resources.py",
        "content_warning": plain_warning(readme["content_warning"]),
        "prompt_normalization": NORMALIZATION,
        "total_bytes": total,
        "files": files,
    }
    manifest_bytes = (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    licenses_bytes = render_licenses(readme, files, outputs).encode("utf-8")

    changed = []
    for name, data in [*blobs.items(), ("MANIFEST.json", manifest_bytes), ("LICENSES.md", licenses_bytes)]:
        if write_if_changed(out / name, data):
            changed.append(name)

    if not quiet:
        for spec in [*SPECS, *AUTHORED]:
            e = files[spec["file"]]
            print(f"{spec['file']:55s} rows={e['rows']:>6} bytes={e['bytes']:>9}")
        print(f"total {total} bytes in {len(files)} files; "
              f"beavertails_unsafe: removed {len(removed_test)} test overlap(s), "
              f"{len(removed_dup)} duplicate prompt(s)")
        print(f"{len(changed)} file(s) written to {out}" if changed else f"{out} already up to date")
    return manifest


# --------------------------------------------------------------------------
# LICENSES.md


def _repeats(rows: list[dict]) -> int:
    seen, n = set(), 0
    for r in rows:
        key = json.dumps(r, ensure_ascii=False)
        n += key in seen
        seen.add(key)
    return n


def render_licenses(readme: dict, files: dict, outputs: dict) -> str:
    L: list[str] = []
    add = L.append
    add("# Bundled data: licences and attribution\n")
    add("The files in this folder are small subsets of public datasets, taken from an offline "
        "data bundle that was itself assembled from public GitHub snapshots (the `source` "
        "column below reads `owner/repo@commit:path`), plus a few files written by the "
        "alignshield authors (see \"Files written by the alignshield authors\"). alignshield's "
        "Apache-2.0 licence covers the code only; **each data file keeps its own licence**, "
        "listed here and in `MANIFEST.json`.\n")
    add(readme["content_warning"] + "\n")
    add("* **Licences differ per file.** BeaverTails, Safety-Tuned LLaMAs, Alpaca and "
        "AlpacaEval are CC BY-NC 4.0 (keep the attribution below, non-commercial use only); "
        "SST-2 and AG News are for (non-commercial) research use; AdvBench, HarmBench safe "
        "responses, GSM8K and hh-rlhf are MIT. " + _authored_licence_sentence(files)
        + " Treat this folder as a whole as non-commercial research material.\n")

    add("## Files\n")
    add("| file | rows | bytes | dataset | licence | source |")
    add("|---|---:|---:|---|---|---|")
    for name, e in files.items():
        if name in DATASET:
            add(f"| `{name}` | {fmt(e['rows'])} | {fmt(e['bytes'])} | {DATASET[name]} | "
                f"{e['licence']} | `{e['source']}` |")
        else:
            add(f"| `{name}` | {fmt(e['rows'])} | {fmt(e['bytes'])} | {AUTHORED_DATASET} | "
                f"{e['licence']} | `{e['authored_file']}` |")
    add("")
    add("Per-file sha256 and the full transformation text are in `MANIFEST.json`.\n")

    add("## Transformations\n")
    add("Bundle step first (from the bundle README), then ours.\n")
    for name, e in files.items():
        if name in DATASET:
            add(f"* `{name}`: {e['transformation']}")
    add("")

    add("## Files written by the alignshield authors\n")
    add("Not from the data bundle: written by the alignshield authors. The canonical copy of each "
        "is `tools/data/<file>`, which the builder checks (each line one JSON object with exactly "
        "the fields below, in order) and copies byte for byte. Their prompts come from the "
        "datasets listed, so those datasets' licences and attribution apply; each file is "
        "licensed as its most restrictive input.\n")
    for spec in AUTHORED:
        e = files[spec["file"]]
        add(f"### `{spec['file']}`\n")
        add(f"* **Fields:** {', '.join(f'`{f}`' for f in e['fields'])}; {fmt(e['rows'])} rows"
            + (" (" + ", ".join(f"{k} {fmt(v)}" for k, v in e["parts"].items()) + ")"
               if "parts" in e else "") + ".")
        add(f"* **How it was made:** {spec['made']}")
        add("* **Inputs:** " + "; ".join(f"{n} ({lic}): {use}" for n, lic, use in spec["upstream"])
            + ".")
        add(f"* **Licence:** {e['licence']}: {spec['licence_basis']}.")
        add("")

    u = files[UNSAFE]
    f2 = files[FIRST200]
    add("## Notes (alignshield)\n")
    add(f"* **Prompt normalization** for every overlap and duplicate check below: {NORMALIZATION}.")
    add(f"* **`{UNSAFE}`** is disjoint by normalized prompt from `{TEST}`, and its prompts are "
        f"unique after normalization. From the bundle's {fmt(u['source_rows'])} rows we removed "
        f"{u['removed']['test_overlap']} row(s) whose prompt occurs in `{TEST}` (bundle file "
        f"{_lines(u['removed']['test_overlap_source_lines'])}) and {u['removed']['duplicate_prompt']} "
        f"row(s) that repeat an earlier prompt (bundle file "
        f"{_lines(u['removed']['duplicate_prompt_source_lines'])}; the first occurrence is kept), "
        f"leaving {fmt(u['rows'])}. These are the 1 case-only test overlap and the 15 repeats "
        "reported in bundle notes 4 and 5.")
    ov = f2["overlap"]
    add(f"* **`{FIRST200}`** is shipped in full (ordering: bundle note 3). "
        f"{len(ov['beavertails_test_lines'])} of its rows have a prompt that also occurs in `{TEST}` ("
        f"{_lines(ov['beavertails_test_lines'])}; BeaverTails splits QA pairs, not prompts) and "
        f"{len(ov['beavertails_unsafe_lines'])} in the shipped `{UNSAFE}` ("
        f"{_lines(ov['beavertails_unsafe_lines'])}). They are kept so the file stays the "
        "published attack set; drop them yourself if you fine-tune on this file and evaluate on "
        f"`{TEST}`.")
    for name in (STL, HB_LONGER):
        ov = files[name]["overlap"]
        n_test = len(ov["beavertails_test_removed_lines"])
        n_uns = len(ov["beavertails_unsafe_lines"])
        removed = (f"removed {n_test} row(s) that overlap it (bundle file "
                   f"{_lines(ov['beavertails_test_removed_lines'])})" if n_test
                   else "nothing removed")
        add(f"* **`{name}`** prompts: {n_test} overlap `{TEST}` ({removed}); {n_uns} overlap the "
            f"shipped `{UNSAFE}`.")
    subsets = [(n, e) for n, e in files.items() if n in DATASET
               and e["rows"] != readme["manifest"][n]["rows"] and n != UNSAFE]
    add("* **Subsets** (rows kept in source order): " + "; ".join(
        f"`{n}` {fmt(e['rows'])} of {fmt(readme['manifest'][n]['rows'])}" for n, e in subsets)
        + ". Every other file from the bundle is a byte-identical copy of the bundle file.")
    add("* **Identical repeated rows in the shipped files** (bundle notes 4 and 5 count them "
        "for the full bundle files): " + "; ".join(
            f"`{n}` {_repeats(outputs[n])}" for n in files if _repeats(outputs[n])) + ".")
    add("")

    add("## Notes from the data bundle\n")
    add("Copied verbatim from the bundle README, keeping its numbering (notes 7 and 13 describe "
        "files not shipped here). Counts in notes 4 and 5 refer to the full bundle files.\n")
    for n in NOTES_COPIED:
        add(readme["notes"][n])
    add("")

    add("## Attribution\n")
    add("Copied from the bundle README (entries for data not shipped here omitted). Please cite "
        "the original datasets:\n")
    for item in _blocks(readme["attribution"], r"^\* "):
        if item.startswith("* ") and not item[2:].startswith(ATTRIBUTION_SKIPPED):
            add(item)
    add("")
    add("Not from the bundle README: the model used for the authored files.\n")
    add("* SmolLM2 (the model whose fine-tuned copies wrote the answers in "
        "`judge/gold_answers.jsonl`): Allal et al., *SmolLM2: When Smol Goes Big*, 2025 "
        "(Hugging Face, `HuggingFaceTB/SmolLM2-135M-Instruct`, Apache-2.0).")
    add("")

    add("## Licence texts\n")
    add("* CC BY-NC 4.0: https://creativecommons.org/licenses/by-nc/4.0/ (legal code: "
        "https://creativecommons.org/licenses/by-nc/4.0/legalcode). The changes made are listed "
        "under Transformations above.")
    add("* MIT: the source repository's MIT licence applies to each MIT file. Its permission "
        "notice:\n")
    add("\n".join("  > " + line if line else "  >" for line in MIT_NOTICE.split("\n")) + "\n")
    add("  Copyright lines of the source repositories' LICENSE files: " + "; ".join(MIT_COPYRIGHT)
        + ". GSM8K (`openai/grade-school-math`) and the HarmBench safe responses "
        "(`busycalibrating/AdversariaLLM`) are recorded as MIT by the data bundle; see those "
        "repositories for their notices.")
    add("* Apache-2.0 (SmolLM2-135M-Instruct, whose fine-tuned copies wrote the answers in "
        "`judge/gold_answers.jsonl`): https://www.apache.org/licenses/LICENSE-2.0. The file "
        "itself is CC BY-NC 4.0 (see Files written by the alignshield authors).")
    add("")

    add("## How these subsets were made\n")
    add("```")
    add("python tools/build_resources.py")
    add("```\n")
    add("The script (standard library only, deterministic) checks each bundle file against the "
        "bundle README's sizes and sha256 prefixes, checks the authored files in `tools/data/` "
        "(fields, one JSON object per line), writes the files above, `MANIFEST.json` and "
        "this `LICENSES.md`. Use `--shared DIR` to point at the bundle, `--authored DIR` at the "
        "authored files and `--out DIR` to write elsewhere; `tests/test_resources.py` rebuilds "
        "into a temporary folder and compares sha256 sums.")
    return "\n".join(L) + "\n"


def _authored_licence_sentence(files: dict) -> str:
    by_lic: dict[str, list[str]] = {}
    for spec in AUTHORED:
        by_lic.setdefault(files[spec["file"]]["licence"], []).append(f"`{spec['file']}`")
    parts = [f"{' and '.join(names)} {'is' if len(names) == 1 else 'are'} {lic}"
             for lic, names in by_lic.items()]
    return ("The files written by the alignshield authors (" + "; ".join(parts)
            + ") take the licence of their most restrictive input.")


def _lines(lines: list[int]) -> str:
    if not lines:
        return "none"
    return ("line " if len(lines) == 1 else "lines ") + ", ".join(str(i) for i in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                    help=f"offline data bundle folder (default: {DEFAULT_SHARED})")
    ap.add_argument("--authored", type=Path, default=DEFAULT_AUTHORED,
                    help="folder of the files written by the alignshield authors "
                         "(default: tools/data)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output folder (default: src/alignshield/resources/data)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not (args.shared / "README.md").is_file():
        print(f"no bundle README at {args.shared}", file=sys.stderr)
        return 2
    build(args.shared, args.out, quiet=args.quiet, authored=args.authored)
    return 0


if __name__ == "__main__":
    sys.exit(main())
