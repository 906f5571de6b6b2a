"""`taskray evaluate`: a bundle's task metrics on a labelled file, in this process."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from actors.bundle import load_bundle
from actors.inference import predict_rows
from actors.preprocess import parse_raw, raw_rows
from cluster.console import progress_bar
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


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays that decoders may leave in a prediction."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_predictions(path: str | Path, rows: list[dict], predictions: list[dict]) -> Path:
    """One JSON line per row: the validated row and the model's prediction for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row, prediction in zip(rows, predictions, strict=True):
            line = {"row": row, "prediction": prediction}
            f.write(json.dumps(line, ensure_ascii=False, default=_plain) + "\n")
    return path


def evaluate_bundle(
    bundle_dir: str,
    data: str,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    show_progress: bool = True,
    predictions_path: str | Path | None = None,
) -> dict[str, Any]:
    """Predict every valid row (any task family) and compute the task's metrics (a progress
    bar over the rows on stderr unless ``show_progress`` is off).

    With ``predictions_path``, every valid row and its prediction are also written there as
    JSONL (``{"row": ..., "prediction": ...}``), for ``taskray report``'s per-example
    pictures (confusion matrix, per-entity-type F1, QA by context length).
    """
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    rows, rejected = read_valid_rows(data, bundle.task)
    if not rows:
        raise ValueError(f"no valid rows in {data} ({len(rejected)} rejected)")
    predictions: list[dict] = []
    bar = progress_bar(len(rows), "evaluate", "row") if show_progress else None
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        predictions.extend(predict_rows(bundle, chunk, max_new_tokens=max_new_tokens))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    metrics = bundle.task.metrics(predictions, rows)
    if predictions_path is not None:
        write_predictions(predictions_path, rows, predictions)
    return {
        "task": bundle.task.name,
        "bundle": bundle.path,
        "data": data,
        "metrics": metrics,
        "rows": len(rows),
        "rejected": rejected,
        "seconds": time.perf_counter() - t0,
    }
