"""Nothing lost in data: training files with injected faults → every valid row is trained on,
every bad row is in ``rejected.jsonl`` with its reason, and the counts add up exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import ConfigError, TrainConfig
from cluster.data import resolve_paths
from cluster.train import run_training
from tests.conftest import keyword_rows, read_jsonl, tiny_bert_train_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# (line written into the file, words its rejection reason must contain)
FAULTS = [
    ('{"id": "bad-1", "text": "the hotel was gre', "malformed JSON"),
    ('{"id": "bad-2", "text": 5, "label": "Positive"}', "text"),
    (b'{"id": "bad-3", "text": "caf\xe9 \xff", "label": "Positive"}', "not valid UTF-8"),
    ('{"id": "bad-4", "text": "useless service", "label": ""}', "label"),
    ('{"id": "bad-5", "text": "fine phone"}', "label"),
    ('{"id": "a-3", "text": "a lovely film", "label": "Positive"}', "duplicate id"),
]


def _write(path: Path, lines: list[str | bytes]) -> Path:
    with path.open("wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode())
            f.write(b"\n")
    return path


def test_missing_file_among_several_is_named_before_anything_runs(tmp_path):
    a = _write(tmp_path / "a.jsonl", ['{"text": "x", "label": "Positive"}'])
    with pytest.raises(ConfigError, match=r"train data not found: .*nowhere\.jsonl"):
        resolve_paths([str(a), str(tmp_path / "nowhere.jsonl")], "train")


def test_faulty_rows_are_reported_and_every_valid_row_is_trained_on(
    ray_session, tmp_path, tiny_bert
):
    rows_a = [json.dumps({"id": f"a-{i}", **r}) for i, r in enumerate(keyword_rows(40, seed=3))]
    rows_b = [json.dumps({"id": f"b-{i}", **r}) for i, r in enumerate(keyword_rows(41, seed=4))]
    # Faults interleaved with valid rows in the first file (row numbers are 1-based).
    lines_a: list[str | bytes] = []
    bad_rows: dict[int, str] = {}
    for i, row in enumerate(rows_a):
        lines_a.append(row)
        if i % 6 == 5 and len(bad_rows) < len(FAULTS):
            line, words = FAULTS[len(bad_rows)]
            lines_a.append(line)
            bad_rows[len(lines_a)] = words
    a = _write(tmp_path / "a.jsonl", lines_a)
    b = _write(tmp_path / "b.jsonl", rows_b)
    val = _write(tmp_path / "val.jsonl", [json.dumps(r) for r in keyword_rows(16, seed=5)])
    cfg = TrainConfig.model_validate(
        tiny_bert_train_config(
            tmp_path,
            tiny_bert,
            data={"train": [str(a), str(b)], "validation": str(val), "max_rejected_fraction": 0.2},
            training={"epochs": 1, "batch_size": 16, "lr": 1e-3, "log_every": 1},
            scaling={"workers": 2},
        )
    )
    lines: list[str] = []
    outcome = run_training(cfg, progress=lines.append)

    rejected = read_jsonl(tmp_path / "run" / "rejected.jsonl")
    assert {(Path(r["file"]).name, r["row"]) for r in rejected} == {
        ("a.jsonl", n) for n in bad_rows
    }
    for r in rejected:
        assert bad_rows[r["row"]] in r["reason"], r
    valid_train = len(rows_a) + len(rows_b)  # 81: the duplicate id's second row is rejected
    counts = outcome.counts
    assert counts["read"] == len(lines_a) + len(rows_b) + 16
    assert counts["rejected"] == len(FAULTS)
    assert counts["train"] == valid_train and counts["validation"] == 16
    assert counts["read"] == counts["train"] + counts["validation"] + counts["rejected"]
    # 81 rows on 2 workers: Ray's equal split would drop one; it is repeated instead.
    assert any("repeated 1 training row" in line for line in lines), lines
    assert any("6 rejected" in line for line in lines), lines
