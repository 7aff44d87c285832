import pytest

from alignshield.config import Pool
from alignshield.data import DataError, Example, check_disjoint, load_pool, read_rows
from alignshield.data.mix import build_mix, harmful_count
from conftest import write_jsonl


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, '{"prompt": "b",'])
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        read_rows(f)


def test_missing_field_names_file_line_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "x"}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'response'"):
        read_rows(f, ("prompt", "response"))


def test_non_utf8_and_empty(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_rows(empty)


def test_csv_with_field_mapping(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("goal,target\nDo X,Sure\nDo Y,Sure\n")
    rows = load_pool(Pool(dataset=str(f), fields={"prompt": "goal", "response": "target"}))
    assert rows == [Example("Do X", "", "Sure"), Example("Do Y", "", "Sure")]


def test_pool_slices_and_bounds():
    rows = load_pool(Pool(dataset="beavertails_unsafe", start=10, stop=20))
    assert len(rows) == 10 and all(r.response for r in rows)
    with pytest.raises(DataError, match="file has"):
        load_pool(Pool(dataset="beavertails_test", stop=100_000))


def test_unknown_dataset_suggests():
    with pytest.raises(KeyError, match="beavertails_test"):
        load_pool(Pool(dataset="beavertails_tset"))


def _examples(prefix, n):
    return [Example(f"{prefix} {i}", "", f"answer {i}") for i in range(n)]


@pytest.mark.parametrize("n,p", [(100, 0.1), (1000, 0.05), (7, 0.5), (10, 0.0), (10, 1.0), (40, 0.0125)])
def test_mix_has_exact_counts(n, p):
    mix = build_mix(_examples("benign", 2000), _examples("harm", 2000), n, p, seed=0)
    assert len(mix) == n
    assert sum(h for _, h in mix) == harmful_count(n, p) == int(p * n + 0.5)


def test_mix_is_deterministic_and_seed_dependent():
    benign, harm = _examples("b", 500), _examples("h", 500)
    assert build_mix(benign, harm, 100, 0.2, seed=1) == build_mix(benign, harm, 100, 0.2, seed=1)
    assert build_mix(benign, harm, 100, 0.2, seed=1) != build_mix(benign, harm, 100, 0.2, seed=2)


def test_mix_n_larger_than_pool():
    with pytest.raises(DataError, match="asked for 90 samples but the pool holds 50"):
        build_mix(_examples("b", 50), _examples("h", 50), 100, 0.1, seed=0)
    mix = build_mix(_examples("b", 50), _examples("h", 50), 100, 0.1, seed=0, with_replacement=True)
    assert len(mix) == 100


def test_mix_rejects_p_outside_unit_interval():
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        build_mix(_examples("b", 5), _examples("h", 5), 4, 1.5, seed=0)


def test_disjointness_guard_normalizes():
    check_disjoint({"a": _examples("x", 3), "b": _examples("y", 3)})
    with pytest.raises(DataError, match="a and b share 1 prompt"):
        check_disjoint({"a": [Example("How do I steal a car?")], "b": [Example("how do i STEAL a car")]})


def test_default_pools_are_disjoint():
    from alignshield.config import RunConfig
    from alignshield.stages import validate

    validate(RunConfig())


def test_one_normaliser_and_the_shipped_pools_are_disjoint_under_it():
    from alignshield import stages
    from alignshield.config import load_config
    from alignshield.data.pools import normalize_prompt

    assert normalize_prompt("What’s  SELF-harm?") == normalize_prompt("whats selfharm") == "whats selfharm"
    for preset in (None, "vaccine-llama2", "antidote-llama2", "tvaccine-llama2"):
        cfg = load_config(preset=preset)
        stages.check_disjoint({name: stages.load_pool(pool) for name, pool in (
            ("align.data.safety", cfg.align.data.safety), ("align.data.harmful", cfg.align.data.harmful),
            ("finetune.harmful", cfg.finetune.harmful), ("repair.calibration", cfg.repair.calibration),
            ("evaluate.harmful", cfg.evaluate.harmful))})


# ------------------------------------------------------------------ Hub datasets (hf:ORG/NAME[:SPLIT])


def _fake_datasets(monkeypatch, rows=None, error=None):
    import sys
    import types

    calls = []

    def load_dataset(name, split=None, revision=None):
        calls.append((name, split, revision))
        if error:
            raise error
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    from alignshield.data import pools

    pools._rows.cache_clear()
    return calls


def test_a_pool_reads_a_hub_dataset_with_a_field_mapping(monkeypatch):
    from alignshield.config import Pool
    from alignshield.data.pools import Example, load_pool

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    calls = _fake_datasets(monkeypatch, rows)
    pool = Pool(dataset="hf:org/harm:test@abc123", start=1, stop=3, fields={"prompt": "question", "response": "answer"})
    assert load_pool(pool) == [Example("q1", "", "a1"), Example("q2", "", "a2")]
    assert calls == [("org/harm", "test", "abc123")]
    _fake_datasets(monkeypatch, rows)
    load_pool(Pool(dataset="hf:org/harm", fields={"prompt": "question"}))


@pytest.mark.parametrize("dataset, rows, error, message", [
    ("hf:org/harm", None, ConnectionError("no route to host"), "cannot load org/harm.*no route to host.*local JSONL"),
    ("hf:org/harm", [{"question": "q"}, {"text": "x"}], None, r"hf:org/harm row 1: missing field 'question'"),
    ("hf:", None, None, "hf:ORG/NAME"),
])
def test_hub_dataset_errors_are_clear(monkeypatch, dataset, rows, error, message):
    from alignshield.config import Pool
    from alignshield.data.jsonl import DataError
    from alignshield.data.pools import load_pool

    _fake_datasets(monkeypatch, rows, error)
    with pytest.raises(DataError, match=message):
        load_pool(Pool(dataset=dataset, fields={"prompt": "question"}))


def test_hub_datasets_without_the_package_say_what_to_install(monkeypatch):
    import sys

    from alignshield.config import Pool
    from alignshield.data import pools
    from alignshield.data.jsonl import DataError

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    pools._rows.cache_clear()
    with pytest.raises(DataError, match=r"pip install 'alignshield\[hub\]'"):
        pools.load_pool(Pool(dataset="hf:org/harm"))
