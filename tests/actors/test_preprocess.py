"""Reading raw rows with row numbers, and batch validation (no Ray needed)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.preprocess import raw_rows, validate_batch
from tasks import get_task


def test_jsonl_keeps_line_numbers_and_undecodable_lines():
    data = b'{"text": "a", "label": "x"}\n\n{"text": "b"\n\xff\xfe bad\n'
    rows = raw_rows(data, "f.jsonl")
    assert [n for n, _ in rows] == [1, 3, 4]
    assert rows[2][1].startswith("\x00not valid UTF-8")


def test_csv_parquet_and_json_array(tmp_path):
    csv_rows = raw_rows(b"text,label\nhello,Positive\nbye,Negative\n", "f.csv")
    assert [json.loads(r) for _, r in csv_rows][1] == {"text": "bye", "label": "Negative"}
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": ["x", "y"], "label": ["a", "b"]}), buf)
    pq_rows = raw_rows(buf.getvalue().to_pybytes(), "f.parquet")
    assert [n for n, _ in pq_rows] == [1, 2]
    assert json.loads(pq_rows[1][1]) == {"text": "y", "label": "b"}
    arr = raw_rows(b'[{"text": "x"}, {"text": "y"}]', "f.json")
    assert len(arr) == 2
    broken = raw_rows(b"[{", "f.json")
    assert broken[0][1].startswith("\x00unparseable")


def test_validate_batch_reports_reasons_and_splits_stably():
    spec = get_task("classification", labels=["Negative", "Positive"]).spec()
    raws = [
        '{"text": "good", "label": "Positive"}',
        '{"text": "bad", "label": "Meh"}',
        '{"text": "trunc',
        '{"label": "Positive"}',
    ]
    batch = {
        "_path": np.array(["f"] * 4, dtype=object),
        "_row": np.arange(1, 5),
        "_raw": np.array(raws, dtype=object),
    }
    out = validate_batch(batch, spec, split_fraction=0.5, split_seed=3)
    errors = list(out["_error"])
    assert errors[0] == ""
    assert errors[1].startswith("label: unknown label 'Meh'")
    assert errors[2].startswith("row: malformed JSON")
    assert errors[3] == "text: missing field"
    again = validate_batch(batch, spec, split_fraction=0.5, split_seed=3)
    assert list(out["_split"]) == list(again["_split"])
    assert json.loads(out["_labels"][0]) == ["Positive"]


def test_the_split_is_the_same_wherever_the_data_lies():
    """A copy of the data in another directory (another node's mount, a CI clone) splits the
    same rows the same way; another seed splits them otherwise."""
    spec = get_task("classification", labels=["Negative", "Positive"]).spec()
    rows = 200
    raws = np.array(['{"text": "good", "label": "Positive"}'] * rows, dtype=object)

    def split(path: str, seed: int = 3) -> list[str]:
        batch = {"_path": np.array([path] * rows, dtype=object), "_row": np.arange(1, rows + 1),
                 "_raw": raws}  # fmt: skip
        return list(validate_batch(batch, spec, split_fraction=0.2, split_seed=seed)["_split"])

    here = split("/work/main/data/sentiment/train.jsonl")
    assert here == split("/tmp/ci/data/sentiment/train.jsonl")
    assert here != split("/work/main/data/sentiment/train.jsonl", seed=4)
    assert 20 <= here.count("validation") <= 60
