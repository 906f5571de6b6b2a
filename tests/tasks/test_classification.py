"""The classification task: schema, labels, encoding, decoding, metrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tasks import TASKS, RowError, TaskError, get_task


def task(labels=("Negative", "Positive"), max_length=16):
    return get_task("classification", max_length=max_length, labels=list(labels))


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        ({"label": "Positive"}, "text", "missing"),
        ({"text": "fine"}, None, None),  # label is optional (inference requests)
        ({"text": 3, "label": "Positive"}, "text", "string"),
        ({"text": "   ", "label": "Positive"}, "text", "non-empty"),
        ({"text": "ok", "label": "Neutral"}, "label", "unknown label"),
        ({"text": "ok", "label": True}, "label", "not a bool"),
        ({"text": "ok", "label": ["Positive"]}, "label", "not a list"),
        (["not", "an", "object"], "row", "JSON object"),
    ],
)
def test_validation_names_the_field(row, field, fragment):
    if field is None:
        assert task().validate(row)["text"] == "fine"
        return
    with pytest.raises(RowError) as info:
        task().validate(row)
    assert info.value.field == field
    assert fragment in info.value.reason
    assert str(info.value).startswith(f"{field}: ")


def test_int_labels_become_names_and_sort_numerically():
    t = get_task("classification")
    assert t.validate({"text": "a", "label": 2})["label"] == "2"
    assert t.sort_labels({"10", "2", "1"}) == ["1", "2", "10"]
    assert t.sort_labels({"b", "a"}) == ["a", "b"]


def test_label_set_rules():
    with pytest.raises(TaskError, match="unique"):
        task(labels=["a", "a"])
    with pytest.raises(TaskError, match="at least 2"):
        task(labels=["only"])
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(TaskError, match="formulation"):
        get_task("classification", formulation="decoder-maybe")


def test_encoding_truncates_and_maps_labels(minilm_tokenizer):
    t = task(max_length=8)
    long = {"text": "word " * 50, "label": "Positive"}
    features = t.encode_row(t.validate(long), minilm_tokenizer)
    assert len(features["input_ids"]) == 8
    assert features["input_ids"][0] == minilm_tokenizer.cls_token_id
    assert features["input_ids"][-1] == minilm_tokenizer.sep_token_id
    assert len(features["attention_mask"]) == 8
    assert features["labels"] == 1
    assert "labels" not in t.encode_row(t.validate({"text": "hi"}), minilm_tokenizer)


def test_decode_is_softmax_argmax():
    t = task()
    logits = np.array([[2.0, 0.0], [-1.0, 3.0]])
    preds = t.decode(logits, all_scores=True)
    assert [p["label"] for p in preds] == ["Negative", "Positive"]
    expected = np.exp(2.0) / (np.exp(2.0) + 1.0)
    assert preds[0]["score"] == pytest.approx(expected)
    assert sum(preds[1]["scores"].values()) == pytest.approx(1.0)
    assert "scores" not in t.decode(logits)[0]


def test_metrics_match_sklearn():
    t = task(labels=["a", "b", "c"])
    gold = ["a", "b", "c", "a", "b", "c", "a"]
    pred = ["a", "b", "a", "a", "c", "c", "b"]
    m = t.metrics([{"label": p} for p in pred], [{"label": g} for g in gold])
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    # by hand for class a: tp=2, fp=1, fn=1 → f1 = 2/3
    assert f1_score(gold, pred, labels=["a"], average="macro") == pytest.approx(2 / 3)


def test_registry_describes_every_task():
    for name, cls in TASKS.items():
        d = cls.describe()
        assert d["name"] == name
        assert d["formulations"]
        assert d["row_schema"]
