"""Row-level work that Ray Data runs on batches: reading with row numbers, validation,
tokenisation. These are the UDFs; the pipeline that wires them lives in ``cluster.data``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from tasks import RowError, task_from_spec

RAW_COLUMNS = ("_path", "_row", "_raw")
"""Columns of a read: source file, 1-based row number in that file, the row as JSON text."""


class RowsDatasource(FileBasedDatasource):
    """Reads JSONL, JSON-array, Parquet or CSV files as raw rows with their row numbers.

    Ray's own readers (``read_json`` etc.) fail the whole read on one malformed line and do not
    keep row numbers; here every row (even an unparseable one) comes through as text with its
    number, so validation can report it instead of losing it.
    """

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        numbered = raw_rows(f.readall(), path)
        yield pa.table(
            {
                "_path": [path] * len(numbered),
                "_row": [n for n, _ in numbered],
                "_raw": [r for _, r in numbered],
            }
        )


def raw_rows(data: bytes, path: str) -> list[tuple[int, str]]:
    """Split a file's bytes into ``(row number, row as JSON text)`` pairs by its type.

    Rows that cannot even be decoded are kept as text starting with NUL and a reason, so the
    validator reports them with their number instead of the read failing.
    """
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(pa.BufferReader(data))
        rows = [json.dumps(r, default=str, ensure_ascii=False) for r in table.to_pylist()]
    elif lower.endswith(".csv"):
        import csv
        import io

        text = data.decode("utf-8", errors="replace")
        rows = [json.dumps(r, ensure_ascii=False) for r in csv.DictReader(io.StringIO(text))]
    elif lower.endswith(".json") and data.lstrip()[:1] == b"[":
        try:
            rows = [json.dumps(r, ensure_ascii=False) for r in json.loads(data)]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            rows = [f"\x00unparseable JSON file: {err}"]
    else:
        rows = []
        for line in data.split(b"\n"):
            try:
                rows.append(line.decode("utf-8").rstrip("\r"))
            except UnicodeDecodeError as err:
                rows.append(f"\x00not valid UTF-8: {err.reason} at byte {err.start}")
    # Blank lines keep their number (so later numbers match the file) but are not rows.
    return [(i + 1, r) for i, r in enumerate(rows) if r.strip()]


def _in_validation(path: str, row: int, seed: int, fraction: float) -> bool:
    """A seeded, stable split: the same row lands on the same side on every run and machine.
    Keyed by the file's name, not its path: a checkout, a copy or a mount elsewhere (another
    node, a CI clone) must split the same rows the same way, which an absolute path in the key
    did not (the quickstart's held-out accuracy moved between 0.85 and 0.91 with the clone's
    directory)."""
    digest = hashlib.sha256(f"{seed}:{PurePath(path).name}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def parse_raw(raw: str) -> Any:
    """Parse one raw row; a decoding problem becomes a ``RowError``."""
    if raw.startswith("\x00"):
        raise RowError("row", raw[1:])
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise RowError("row", f"malformed JSON ({err.msg} at column {err.colno})") from None


def validate_batch(
    batch: dict[str, np.ndarray],
    task_spec: dict[str, Any],
    split_fraction: float | None = None,
    split_seed: int = 0,
    id_field: str = "id",
) -> dict[str, np.ndarray]:
    """Validate raw rows against the task's schema.

    Adds ``_json`` (the normalised row), ``_error`` (empty when valid), ``_labels`` (JSON list
    of the label names the row uses), ``_split`` ("train"/"validation" when splitting) and
    ``_id`` (the row's ``id_field`` value as JSON, empty when it has none).
    """
    task = task_from_spec(task_spec)
    out_json, errors, labels, splits, ids = [], [], [], [], []
    for path, row_no, raw in zip(batch["_path"], batch["_row"], batch["_raw"], strict=True):
        parsed = None
        try:
            parsed = parse_raw(str(raw))
            clean = task.validate(parsed)
            out_json.append(json.dumps(clean, ensure_ascii=False))
            errors.append("")
            labels.append(json.dumps(task.label_values(clean)))
        except RowError as err:
            out_json.append("")
            errors.append(str(err))
            labels.append("[]")
        row_id = parsed.get(id_field) if isinstance(parsed, dict) else None
        ids.append("" if row_id is None else json.dumps(row_id))
        if split_fraction is None:
            splits.append("train")
        else:
            val = _in_validation(str(path), int(row_no), split_seed, split_fraction)
            splits.append("validation" if val else "train")
    return {
        "_path": batch["_path"],
        "_row": batch["_row"],
        "_raw": batch["_raw"],
        "_json": np.array(out_json, dtype=object),
        "_error": np.array(errors, dtype=object),
        "_labels": np.array(labels, dtype=object),
        "_split": np.array(splits, dtype=object),
        "_id": np.array(ids, dtype=object),
    }


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The fast tokenizer of a model directory or name (no downloads when offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


TARGET_KEY = {"question_answering": "start_positions"}
"""The feature that carries a row's target, per model kind (``labels`` otherwise)."""
TARGET_FIELD = {
    "classification": "label",
    "nli": "label",
    "ner": "tags",
    "extractive_qa": "answers",
}
"""The row field a missing target is reported under (per family; ``target`` otherwise)."""


class TokenizeRows:
    """Ray Data actor UDF: loads the tokenizer once per actor, encodes validated rows.

    Output columns: ``_path``, ``_row``, ``_error`` (an encoding failure such as an empty
    target after truncation) and one column per model feature.

    With ``image_config`` (the multimodal task: ``{"data_config": timm's data config}``) each
    row's image is also decoded (a path relative to its data file, or a data URI) and run
    through timm's eval transform into a ``pixel_values`` column; an image that is missing,
    corrupt or not an image makes its row an error like any other.
    """

    def __init__(
        self,
        task_spec: dict[str, Any],
        tokenizer_path: str,
        trust_remote_code: bool = False,
        image_config: dict[str, Any] | None = None,
    ) -> None:
        self.task = task_from_spec(task_spec)
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
        self.transform = None
        if image_config is not None:
            from actors.vlm import image_transform

            self.transform = image_transform(image_config["data_config"])
            self.image_shape = tuple(image_config["data_config"]["input_size"])

    def _pixels(self, row: dict[str, Any], data_file: str) -> np.ndarray:
        from tasks.multimodal import read_image_field

        image = read_image_field(row["image"], base_dir=Path(data_file).parent)
        return np.asarray(self.transform(image), dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = [json.loads(str(j)) for j in batch["_json"]]
        encoded = self.task.encode_batch(rows, self.tokenizer)
        target = TARGET_KEY.get(self.task.model_kind, "labels")
        for i, item in enumerate(encoded):
            # Schemas let the target out (inference rows); a training row must have it.
            pieces = item if isinstance(item, list) else [item]
            if any(isinstance(f, dict) and f.get(target) is None for f in pieces):
                encoded[i] = RowError(
                    TARGET_FIELD.get(self.task.name, "target"), "missing (training rows need it)"
                )
        pixels: list[np.ndarray] = []
        if self.transform is not None:
            blank = np.zeros(self.image_shape, dtype=np.float32)
            for i, (row, item) in enumerate(zip(rows, encoded, strict=True)):
                if isinstance(item, RowError):
                    pixels.append(blank)
                    continue
                try:
                    pixels.append(self._pixels(row, str(batch["_path"][i])))
                except RowError as err:
                    encoded[i] = err
                    pixels.append(blank)
        # One row may become several features (extractive QA's doc-stride windows); each
        # keeps its row's file, number and JSON so evaluation can regroup them.
        flat: list[tuple[int, Any]] = []
        for i, item in enumerate(encoded):
            if isinstance(item, list):
                flat.extend((i, window) for window in item)
            else:
                flat.append((i, item))
        keys: list[str] = []
        for _, item in flat:
            if isinstance(item, dict):
                keys = list(item)
                break
        columns: dict[str, list[Any]] = {k: [] for k in keys}
        errors = []
        for _, item in flat:
            errors.append(str(item) if isinstance(item, RowError) else "")
            for k in keys:
                value = item.get(k) if isinstance(item, dict) else None
                columns[k].append(_as_array(value))
        source = [i for i, _ in flat]
        out: dict[str, Any] = {
            "_path": batch["_path"][source],
            "_row": batch["_row"][source],
            "_error": np.array(errors, dtype=object),
            "_json": batch["_json"][source],
        }
        out.update({k: _column(v) for k, v in columns.items()})
        if self.transform is not None:
            out["pixel_values"] = np.stack([pixels[i] for i in source])
        return out


def _as_array(value: Any) -> np.ndarray:
    if value is None:
        return np.zeros((0,), dtype=np.int64)
    return np.asarray(value, dtype=np.int64)


def _column(values: list[np.ndarray]) -> Any:
    """Scalars stack into a 1-D array; ragged sequences stay a list (Ray stores them ragged)."""
    if all(v.ndim == 0 for v in values):
        return np.stack(values) if values else np.zeros((0,), dtype=np.int64)
    return values
