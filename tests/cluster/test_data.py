"""The Ray Data preprocessing pipeline: rejections with row numbers, the fraction limit."""

from __future__ import annotations

import json

import pytest

from cluster.config import ConfigError, DataOptions
from cluster.data import DataError, prepare_datasets, resolve_paths
from tasks import get_task
from tests.conftest import keyword_rows, read_jsonl, write_jsonl

pytestmark = pytest.mark.ray

BAD_ROWS = {
    # line number (1-based, after 30 good rows) → (raw line, expected reason prefix)
    31: ('{"label": "Positive"}', "text: missing field"),
    32: ('{"text": 17, "label": "Negative"}', "text: Input should be a valid string"),
    33: ('{"text": "", "label": "Negative"}', "text: Value error, must be a non-empty string"),
    34: ('{"text": "fine", "label": "Sideways"}', "label: unknown label 'Sideways'"),
    35: ('{"text": "cut off', "row: malformed JSON"),
    36: ("[1, 2]", "row: expected a JSON object"),
}


def _dataset(tmp_path, good=30):
    lines = [json.dumps(r) for r in keyword_rows(good)] + [raw for raw, _ in BAD_ROWS.values()]
    return write_jsonl(tmp_path / "train.jsonl", lines)


def test_each_bad_row_is_rejected_with_row_and_reason(ray_session, tmp_path, minilm_tokenizer):
    train = _dataset(tmp_path)
    val = write_jsonl(tmp_path / "val.jsonl", keyword_rows(10, seed=1))
    task = get_task("classification", max_length=32, labels=["Negative", "Positive"])
    data = prepare_datasets(
        task,
        DataOptions(train=str(train), validation=str(val), max_rejected_fraction=0.5),
        minilm_tokenizer.name_or_path,
        tmp_path / "run",
        progress=lambda *_: None,
    )
    rejected = read_jsonl(tmp_path / "run" / "rejected.jsonl")
    assert {r["row"]: r["reason"] for r in rejected}.keys() == BAD_ROWS.keys()
    for r in rejected:
        assert r["reason"].startswith(BAD_ROWS[r["row"]][1]), r
        assert r["file"] == str(train)
    assert data.counts == {"read": 46, "rejected": 6, "train": 30, "validation": 10}
    assert data.train.count() == 30
    row = data.train.take(1)[0]
    assert {"input_ids", "attention_mask", "labels", "_json"} <= set(row)


def test_fraction_limit_fails_naming_the_file(ray_session, tmp_path, minilm_tokenizer):
    train = _dataset(tmp_path)
    task = get_task("classification", max_length=32, labels=["Negative", "Positive"])
    with pytest.raises(DataError) as info:
        prepare_datasets(
            task,
            DataOptions(train=str(train), max_rejected_fraction=0.05),
            minilm_tokenizer.name_or_path,
            tmp_path / "run",
            progress=lambda *_: None,
        )
    message = str(info.value)
    assert "6 of 36 rows" in message
    assert str(tmp_path / "run" / "rejected.jsonl") in message


def test_labels_inferred_sorted_and_split_is_stable(ray_session, tmp_path, minilm_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", keyword_rows(60))
    splits = []
    for _ in range(2):
        task = get_task("classification", max_length=32)
        data = prepare_datasets(
            task,
            DataOptions(train=str(train), validation_fraction=0.25, split_seed=7),
            minilm_tokenizer.name_or_path,
            tmp_path / "run",
            progress=lambda *_: None,
        )
        assert task.labels == ["Negative", "Positive"]
        splits.append(sorted(int(r["_row"]) for r in data.validation.take_all()))
        assert data.counts["train"] + data.counts["validation"] == 60
    assert splits[0] == splits[1]
    assert 5 <= len(splits[0]) <= 25


def test_missing_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train data not found"):
        resolve_paths(str(tmp_path / "nope.jsonl"), "train")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match="unsupported type"):
        resolve_paths(str(tmp_path / "x.txt"), "train")


def test_packing_keeps_every_sequence_once(ray_session, tmp_path):
    from actors.modeling import resolve_model_path
    from tests.conftest import ROOT_DIR

    task = get_task("generation", max_length=256)
    data = prepare_datasets(
        task,
        DataOptions(
            train=str(ROOT_DIR / "data" / "fixtures" / "generation.jsonl"),
            validation_fraction=0.2,
            packing=True,
        ),
        resolve_model_path("tiny:llama"),
        tmp_path / "run",
        progress=lambda *_: None,
    )
    rows = data.train.take_all()
    assert data.counts["train"] == len(rows) < data.counts["train_sequences"]
    packed_ids = sorted(int(i) for r in rows for i in r["_rows"])
    assert len(packed_ids) == data.counts["train_sequences"] == len(set(packed_ids))
    for r in rows:
        assert len(r["input_ids"]) == sum(r["seq_lens"]) <= 256
        assert len(r["position_ids"]) == len(r["input_ids"])
        starts = [0, *list(__import__("numpy").cumsum(r["seq_lens"])[:-1])]
        assert all(r["position_ids"][s] == 0 for s in starts)
