import pytest

from alignshield.tasks import AGNEWS_LABELS, TASKS, parse_number, rouge_l, score_label

SST2 = ("positive", "negative")


@pytest.mark.parametrize("answer,strict,lenient", [
    ("positive", 1, 1), ("Positive.", 1, 1), ("The sentiment is positive.", 0, 1),
    ("positive or negative", 0, 0), ("negative", 0, 0), ("", 0, 0), ("positively", 0, 0),
])
def test_sst2_strict_and_lenient(answer, strict, lenient):
    assert score_label(answer, "positive", SST2) == {"strict": strict, "lenient": lenient}


def test_agnews_labels():
    assert score_label("Sci/Tech", "Sci/Tech", AGNEWS_LABELS)["strict"] == 1
    assert score_label("This is about Sports", "Sports", AGNEWS_LABELS) == {"strict": 0, "lenient": 1}


@pytest.mark.parametrize("text,value", [
    ("#### 1,234", 1234.0), ("x = 3 then 4 #### 72", 72.0), ("The final answer is: -5.5 dollars", -5.5),
    ("so 3 apples and 4 pears", 4.0), ("no number", None),
])
def test_gsm8k_parser(text, value):
    assert parse_number(text) == value


def test_rouge_l():
    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("", "a") == 0.0
    assert abs(rouge_l("a x c", "a b c") - 2 / 3) < 1e-9


@pytest.mark.parametrize("name", ["sst2", "agnews", "gsm8k", "alpaca"])
def test_every_task_loads_and_scores_its_reference_perfectly(name):
    task = TASKS.get(name)
    rows = task.rows("test")[:20]
    for row in rows:
        example = task.to_example(row)
        headline = next(iter(task.score(example.response, row).values()))
        assert headline == 1.0
    assert len(task.rows("train")) >= 1000
