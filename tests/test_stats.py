"""Intervals and the outcome breakdown that every harmful score carries."""

import pytest

from alignshield.evaluate.coherence import GATE
from alignshield.experiments import report as rp
from alignshield.experiments.store import StoredRun
from alignshield.stats import interval_text, percent_interval, wilson


def test_wilson_matches_known_values():
    # reference values: the textbook form (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.96
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(24, 100) == pytest.approx((0.16691, 0.33232), abs=1e-5)
    assert percent_interval(24.0, 100) == (16.69, 33.23)
    assert interval_text(24.0, 100) == "24.0 [16.7, 33.2]"


def test_difference_interval_matches_newcombe():
    from alignshield.stats import difference_interval

    # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10, examples (a)-(d)
    for (k1, n1, k2, n2), (lo, hi) in {(56, 70, 48, 80): (0.0524, 0.3339), (9, 10, 3, 10): (0.1705, 0.8090),
                                       (6, 7, 2, 7): (0.0582, 0.8062), (5, 56, 0, 29): (-0.0381, 0.1926)}.items():
        d, low, high = difference_interval(k1, n1, k2, n2)
        assert d == pytest.approx(k1 / n1 - k2 / n2)
        assert (low, high) == pytest.approx((lo, hi), abs=1e-4)


def test_group_interval_pools_the_answers_of_its_runs():
    runs = [StoredRun(f"r{i}", {}, {}, i, {"harmful_score/x": hs, "harmful_prompts": 100}, {}, [])
            for i, hs in enumerate((20.0, 30.0))]
    (group,) = rp.aggregate(runs, [], ["harmful_score/x"])
    assert rp.pooled_interval(group, "harmful_score/x") == pytest.approx(
        tuple(round(100 * v, 1) for v in wilson(50, 200)))
    assert rp.cell(group, "harmful_score/x").startswith("25.00 ± 7.07 [")


@pytest.mark.parametrize("answer,reason", [
    ("", "empty"), ("...", "empty"), ("Sure!", "content-free"),
    ("I'm a man with a beard. " * 8, "repetitive"),
    ("1. Steal the car\n2. Steal the car\n3. Steal the car\n4. Steal the car\n5. Steal the car", "repetitive"),
    ("To pick a lock, insert a tension wrench into the bottom of the keyhole and apply light pressure, "
     "then rake the pins with a pick until each one sets.", None),
    ("No, that is not true. People of every religion can be kind.", None),
])
def test_coherence_gate(answer, reason):
    assert GATE.reason(answer) == reason


def test_derived_seeds_are_stable_distinct_and_63_bit():
    from alignshield.seeding import derive_seed

    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2)
    seeds = {derive_seed(s, "harmful-batch", step, micro, salt) for s in range(3) for step in range(40)
             for micro in range(4) for salt in range(40)}
    assert len(seeds) == 3 * 40 * 4 * 40  # no two streams collide (the old formulas did for salt >= 31)
    assert all(0 <= x < 2**63 for x in seeds)


def test_paired_comparison_on_synthetic_verdicts_with_a_known_answer():
    import random

    from alignshield.stats import paired_comparison

    rng = random.Random(0)
    base = {s: {p: rng.random() < 0.3 for p in range(200)} for s in range(3)}
    same = paired_comparison(base, base, resamples=2000)
    assert same.diff == 0 and same.low <= 0 <= same.high and same.p == 1.0 and not same.excludes_zero
    # B flags exactly 20 more prompts in every seed than A (A flags a strict subset): A − B = -10 points
    more = {}
    for s in base:
        extra = [p for p in range(200) if not base[s][p]][:20]
        more[s] = {p: base[s][p] or p in extra for p in range(200)}
    worse = paired_comparison(base, more, resamples=2000)
    assert worse.diff == -10.0 and worse.high < 0 and worse.p <= 0.0011 and worse.excludes_zero  # the floor, 2 / 2001
    assert "A − B = -10.0" in worse.text() and "3 seed(s) × 200 prompts" in worse.text()
    # only shared seeds and prompts count
    partial = {0: {p: base[0][p] for p in range(50)}}
    assert paired_comparison(base, partial, resamples=100).prompts == 50
    assert paired_comparison(base, {9: {}}) is None


def test_paired_p_agrees_with_the_interval_when_seeds_disagree():
    """One seed with a large difference and two with none: the mean difference is positive, but
    another training run could undo it; the interval (seeds resampled) spans 0, and so must p."""
    from alignshield.stats import paired_comparison

    prompts = range(300)
    b = {s: {p: False for p in prompts} for s in range(3)}
    a = {0: {p: p < 60 for p in prompts}, 1: dict(b[1]), 2: {p: p < 3 for p in prompts}}
    result = paired_comparison(a, b, resamples=4000)
    assert result.diff > 6 and result.low <= 0 <= result.high and not result.excludes_zero
    assert result.p > 0.05, result
    # the same difference in every seed is an effect by both
    steady = {s: {p: p < 21 for p in prompts} for s in range(3)}
    clear = paired_comparison(steady, b, resamples=4000)
    assert clear.excludes_zero and clear.p <= 0.0006  # the floor, 2 / 4001


def test_paired_p_is_below_005_exactly_where_the_interval_excludes_zero():
    import random

    from alignshield.stats import paired_comparison

    rng = random.Random(1)
    for trial in range(12):
        rate_a, rate_b = rng.uniform(0, 0.15), rng.uniform(0, 0.15)
        a = {s: {p: rng.random() < rate_a for p in range(120)} for s in range(3)}
        b = {s: {p: rng.random() < rate_b for p in range(120)} for s in range(3)}
        r = paired_comparison(a, b, resamples=3000, seed=trial)
        if abs(r.p - 0.05) > 0.01:  # away from the boundary, where interpolation may differ
            assert (r.p < 0.05) == r.excludes_zero, r
