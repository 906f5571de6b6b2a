"""`taskray evaluate`: a bundle's task metrics on a labelled file, in this process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from actors.bundle import load_bundle
from actors.inference import predict_rows
from actors.preprocess import parse_raw, raw_rows
from cluster.data import resolve_paths
from tasks import RowError


def read_valid_rows(spec: str, task: Any) -> tuple[list[dict], list[dict]]:
    """Validated rows of a file or folder, and the rejected ones with their reasons."""
    valid: list[dict] = []
    rejected: list[dict] = []
    for path in resolve_paths(spec, "data"):
        for number, raw in raw_rows(Path(path).read_bytes(), path):
            try:
                valid.append(task.validate(parse_raw(raw)))
            except RowError as err:
                rejected.append({"file": path, "row": number, "reason": str(err)})
    return valid, rejected


def evaluate_bundle(
    bundle_dir: str, data: str, batch_size: int = 64, max_new_tokens: int = 64
) -> dict[str, Any]:
    """Predict every valid row (any task family) and compute the task's metrics."""
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    rows, rejected = read_valid_rows(data, bundle.task)
    if not rows:
        raise ValueError(f"no valid rows in {data} ({len(rejected)} rejected)")
    predictions: list[dict] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        predictions.extend(predict_rows(bundle, chunk, max_new_tokens=max_new_tokens))
    metrics = bundle.task.metrics(predictions, rows)
    return {
        "task": bundle.task.name,
        "bundle": bundle.path,
        "data": data,
        "metrics": metrics,
        "rows": len(rows),
        "rejected": rejected,
        "seconds": time.perf_counter() - t0,
    }
