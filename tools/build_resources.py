#!/usr/bin/env python3
"""Build the data subsets shipped in ``src/alignshield/resources/data/``.

Reads the offline data bundle (default: ``<repo>/../shared/data``), checks every
input file against the bundle README's manifest table (bytes and sha256
prefix), and writes:

* the JSONL subsets listed in ``SPECS`` (same field names and order as the
  bundle, UTF-8, ``ensure_ascii=False``, one object per line, source order);
* ``MANIFEST.json``: rows, bytes, sha256, fields, source, licence and
  transformation of every shipped file, plus the overlap checks;
* ``LICENSES.md``: licence and attribution per file, the relevant bundle
  notes and our own notes.

Standard library only. Deterministic (no timestamps, no absolute paths, no
randomness) and idempotent: a file is rewritten only if its bytes change.

Usage::

    python tools/build_resources.py [--shared DIR] [--out DIR]

The package never reads the bundle at runtime; only this tool and the tests do.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import string
import sys
import unicodedata
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "src" / "alignshield" / "resources" / "data"

MAX_FILE_BYTES = 5 * 1024 * 1024
MAX_TOTAL_BYTES = 20 * 1024 * 1024

UNSAFE = "harmful/beavertails_unsafe.jsonl"
TEST = "harmful/beavertails_test.jsonl"
FIRST200 = "harmful/beavertails_30k_train_unsafe_first200.jsonl"
STL = "alignment/safety_tuned_llamas.jsonl"
HB_LONGER = "alignment/harmbench_safe_responses_longer.jsonl"

NORMALIZATION = (
    "lower-case (str.lower); delete every punctuation character (Unicode "
    "category P* and ASCII string.punctuation); collapse runs of whitespace "
    "to one space and strip the ends"
)

_ASCII_PUNCT = frozenset(string.punctuation)


def normalize_prompt(text: str) -> str:
    """Normalized form used for every prompt-overlap / duplicate check."""
    text = text.lower()
    text = "".join(
        ch for ch in text
        if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P")
    )
    return " ".join(text.split())


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


def build(shared: Path, out: Path, quiet: bool = False) -> dict:
    readme = parse_readme(shared / "README.md")
    bundle = readme["manifest"]
    for spec in SPECS:
        if spec["file"] not in bundle:
            raise SystemExit(f"{spec['file']} is not in the bundle README manifest")

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

    # Serialise and check sizes.
    blobs = {name: dump_jsonl(outputs[name]) for name in outputs}
    total = 0
    for spec in SPECS:
        name = spec["file"]
        data = blobs[name]
        total += len(data)
        if len(data) > MAX_FILE_BYTES:
            raise SystemExit(f"{name}: {len(data)} bytes exceeds the {MAX_FILE_BYTES} byte limit")
        if spec["select"] == "full" and sha256(data) != sha256(sources[name][0]):
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

    manifest = {
        "description": "Data subsets shipped with alignshield. Licences differ per file; see LICENSES.md.",
        "generated_by": "python tools/build_resources.py",
        "content_warning": "harmful/, alignment/ and judge/ hold harmful, offensive and sexual text, on purpose.",
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
        for spec in SPECS:
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
        "column below reads `owner/repo@commit:path`). alignshield's Apache-2.0 licence covers "
        "the code only; **each data file keeps its own licence**, listed here and in "
        "`MANIFEST.json`.\n")
    add(readme["content_warning"] + "\n")
    add("* **Licences differ per file.** BeaverTails, Safety-Tuned LLaMAs, Alpaca and "
        "AlpacaEval are CC BY-NC 4.0 (keep the attribution below, non-commercial use only); "
        "SST-2 and AG News are for (non-commercial) research use; AdvBench, HarmBench safe "
        "responses, GSM8K and hh-rlhf are MIT. Treat this folder as a whole as non-commercial "
        "research material.\n")

    add("## Files\n")
    add("| file | rows | bytes | dataset | licence | source |")
    add("|---|---:|---:|---|---|---|")
    for name, e in files.items():
        add(f"| `{name}` | {fmt(e['rows'])} | {fmt(e['bytes'])} | {DATASET[name]} | "
            f"{e['licence']} | `{e['source']}` |")
    add("")
    add("Per-file sha256 and the full transformation text are in `MANIFEST.json`.\n")

    add("## Transformations\n")
    add("Bundle step first (from the bundle README), then ours.\n")
    for name, e in files.items():
        add(f"* `{name}`: {e['transformation']}")
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
    subsets = [(n, e) for n, e in files.items() if e["rows"] != readme["manifest"][n]["rows"]
               and n != UNSAFE]
    add("* **Subsets** (rows kept in source order): " + "; ".join(
        f"`{n}` {fmt(e['rows'])} of {fmt(readme['manifest'][n]['rows'])}" for n, e in subsets)
        + ". Every other file is a byte-identical copy of the bundle file.")
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
    add("")

    add("## How these subsets were made\n")
    add("```")
    add("python tools/build_resources.py")
    add("```\n")
    add("The script (standard library only, deterministic) checks each bundle file against the "
        "bundle README's sizes and sha256 prefixes, writes the files above, `MANIFEST.json` and "
        "this `LICENSES.md`. Use `--shared DIR` to point at the bundle and `--out DIR` to write "
        "elsewhere; `tests/test_resources.py` rebuilds into a temporary folder and compares "
        "sha256 sums.")
    return "\n".join(L) + "\n"


def _lines(lines: list[int]) -> str:
    if not lines:
        return "none"
    return ("line " if len(lines) == 1 else "lines ") + ", ".join(str(i) for i in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                    help=f"offline data bundle folder (default: {DEFAULT_SHARED})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output folder (default: src/alignshield/resources/data)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not (args.shared / "README.md").is_file():
        print(f"no bundle README at {args.shared}", file=sys.stderr)
        return 2
    build(args.shared, args.out, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
