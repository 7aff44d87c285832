"""tools/hand_labels.py: blind chunks drawn alike from every run, and the labelled score per group."""

import json
import sys
from pathlib import Path

import pytest

from alignshield.config import load_config
from alignshield.experiments.store import ResultStore, RunRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import hand_labels  # noqa: E402


def _runs(tmp_path: Path) -> Path:
    """Two runs of sweep ``s`` (sft and vaccine, seed 1), each with 710 harmful answers and 3 task rows;
    the embedded judge flags prompt i of the sft run when i % 10 == 0, nothing of the vaccine run."""
    out = tmp_path / "runs"
    with ResultStore.in_dir(out) as store:
        store.record_sweep("s", "s.yaml", {"axes": [{"fields": ["align.method"]}]})
        for key, method in (("k-sft", "sft"), ("k-vac", "vaccine")):
            cfg = load_config(overrides=[f"align.method={method}", "seed=1"])
            store.record_run(RunRecord(key, cfg.model_dump(mode="json"), {"align.method": method}, 1), {},
                             sweep="s", position=0 if method == "sft" else 1)
            rows = [{"kind": "harmful", "prompt": f"p{i}", "answer": f"{method} answer {i}",
                     "verdicts": {"embedded": {"flagged": method == "sft" and i % 10 == 0}}} for i in range(710)]
            rows += [{"kind": "task", "prompt": "t", "answer": "positive", "verdicts": {}}] * 3
            folder = out / "evaluate" / key
            folder.mkdir(parents=True)
            (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_chunks_are_blind_and_draw_the_same_prompts_from_every_run(tmp_path):
    runs = _runs(tmp_path)
    hand_labels.main(["chunks", "--runs", str(runs), "--sweep", "s", "--seeds", "1", "--tag", "x",
                      "--out", str(tmp_path / "h"), "--prompts", "50", "--chunks", "2"])
    key = [json.loads(line) for line in (tmp_path / "h" / "key_x.jsonl").open()]
    chunks = [json.loads(line) for c in (0, 1) for line in (tmp_path / "h" / f"chunk_x{c}.jsonl").open()]
    assert len(key) == len(chunks) == 100 and len({k["id"] for k in key}) == 100
    assert [c["id"] for c in chunks] == [k["id"] for k in key]
    assert all(set(c) == {"id", "prompt", "answer"} for c in chunks)  # nothing names the run
    by_run = {run: sorted(k["prompt_index"] for k in key if k["run"] == run) for run in ("k-sft", "k-vac")}
    assert by_run["k-sft"] == by_run["k-vac"] and len(set(by_run["k-sft"])) == 50
    for c, k in zip(chunks, key):
        assert c["prompt"] == f"p{k['prompt_index']}"


def test_analyse_counts_hand_labels_and_scores_the_judges_against_them(tmp_path, capsys):
    runs = _runs(tmp_path)
    labels = tmp_path / "labels.jsonl"
    rows = [{"id": f"{run}{i}", "run": run, "seed": 1, "prompt_index": i,
             "label": "harmful" if run == "k-sft" and i % 10 == 0 else ("borderline" if i == 1 else "not"),
             "kind": "x", "reason": "r"} for run in ("k-sft", "k-vac") for i in range(40)]
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hand_labels.main(["analyse", "--runs", str(runs), "--sweep", "s", "--labels", str(labels)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sft"]["hand_harmful"] == 10.0 and summary["vaccine"]["hand_harmful"] == 0.0
    assert summary["sft"]["hand_borderline"] == 2.5
    assert summary["sft"]["embedded"] == {"flagged": 10.0, "kappa": 1.0, "precision": 1.0, "recall": 1.0}
    assert summary["difference"]["of"] == "vaccine - sft" and summary["difference"]["diff"] == pytest.approx(-10.0)
    assert summary["difference"]["prompts"] == 40 and summary["difference"]["high"] < 0


def test_analyse_follows_a_run_judged_again(tmp_path, capsys):
    """Labels name the evaluation they were drawn from; after the same answers are judged again (a new
    evaluation of the same config, e.g. by a retrained judge), analyse scores today's verdicts."""
    runs = _runs(tmp_path)
    with ResultStore.in_dir(runs) as store:
        cfg = load_config(overrides=["align.method=sft", "seed=1"])
        store.record_run(RunRecord("k-sft-again", cfg.model_dump(mode="json"), {"align.method": "sft"}, 1), {},
                         sweep="s", position=0)
    rows = [{"kind": "harmful", "prompt": f"p{i}", "answer": f"sft answer {i}",
             "verdicts": {"embedded": {"flagged": i % 20 == 0}}} for i in range(710)]
    (runs / "evaluate" / "k-sft-again").mkdir(parents=True)
    (runs / "evaluate" / "k-sft-again" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": f"a{i}", "run": "k-sft", "seed": 1, "prompt_index": i,
                                          "label": "harmful" if i % 10 == 0 else "not", "kind": "x", "reason": "r"})
                              + "\n" for i in range(40)))
    hand_labels.main(["analyse", "--runs", str(runs), "--sweep", "s", "--labels", str(labels)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sft"]["hand_harmful"] == 10.0
    assert summary["sft"]["embedded"]["flagged"] == 5.0 and summary["sft"]["embedded"]["precision"] == 1.0


def test_chunks_filter_runs_and_draw_from_the_runs_own_prompt_count(tmp_path):
    runs = _runs(tmp_path)
    hand_labels.main(["chunks", "--runs", str(runs), "--sweep", "s", "--seeds", "1", "--tag", "y",
                      "--out", str(tmp_path / "h"), "--prompts", "20", "--chunks", "1", "--where", "align.method=vaccine"])
    key = [json.loads(line) for line in (tmp_path / "h" / "key_y.jsonl").open()]
    assert {k["run"] for k in key} == {"k-vac"} and len(key) == 20
    hand_labels.main(["chunks", "--runs", str(runs), "--sweep", "s", "--seeds", "1", "--tag", "w", "--out", str(tmp_path / "h"),
                      "--prompts", "5", "--chunks", "1", "--where", "align.method=vaccine", "--where", "align.method=sft"])
    assert {json.loads(line)["run"] for line in (tmp_path / "h" / "key_w.jsonl").open()} == {"k-vac", "k-sft"}
    with pytest.raises(SystemExit, match="> the 710 harmful prompts"):
        hand_labels.main(["chunks", "--runs", str(runs), "--sweep", "s", "--seeds", "1", "--tag", "z",
                          "--out", str(tmp_path / "h"), "--prompts", "711"])
    with pytest.raises(SystemExit, match="no finished run"):
        hand_labels.main(["chunks", "--runs", str(runs), "--sweep", "s", "--seeds", "1", "--tag", "z",
                          "--out", str(tmp_path / "h"), "--where", "align.method=tar"])
