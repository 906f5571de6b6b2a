"""Ray Data pipelines: read → validate → (infer labels) → split → tokenise in an actor pool.

Every input row is either kept or written to ``<run_dir>/rejected.jsonl`` with its file, row
number and reason; past ``max_rejected_fraction`` the run stops with a message naming that file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.packing import pack_batch, packing_efficiency
from actors.preprocess import RowsDatasource, TokenizeRows, validate_batch
from cluster.config import ConfigError, DataOptions
from tasks import Task

log = logging.getLogger("taskray")

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(RuntimeError):
    """The data cannot be trained on (too many bad rows, no rows left...)."""


def resolve_paths(spec: str | list[str], what: str) -> list[str]:
    """A file, every data file in a folder, or those of each item of a list; a missing path
    (even one among several) is a one-line error naming it: nothing is silently left out."""
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{what} data: the list of files is empty")
        return [f for item in spec for f in resolve_paths(item, what)]
    path = Path(spec)
    if "://" in spec:
        return [spec]
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise ConfigError(
                f"{what} file {path} has an unsupported type (use {', '.join(DATA_SUFFIXES)})"
            )
        return [str(path.resolve())]
    if path.is_dir():
        files = sorted(str(p.resolve()) for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        if not files:
            raise ConfigError(f"{what} folder {path} holds no {', '.join(DATA_SUFFIXES)} files")
        return files
    raise ConfigError(f"{what} data not found: {path} (check the path or pass --{what} FILE)")


def read_rows(paths: list[str]) -> Any:
    """Raw rows with file and row number (see ``RowsDatasource``)."""
    import ray.data

    return ray.data.read_datasource(
        RowsDatasource(paths, file_extensions=["jsonl", "json", "parquet", "csv"])
    )


def _unique_labels(batch: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    found: set[str] = set()
    for item in batch["_labels"]:
        found.update(json.loads(str(item)))
    return {"label": np.array(sorted(found), dtype=object)}


def find_duplicate_ids(datasets: list[Any], field: str) -> dict[tuple[str, int], dict]:
    """Rows whose ``field`` value an earlier valid row (in file, row order; train files
    before validation files) already has: ``(file, row) → rejected-row record``.

    Only the ids travel to the driver (one short string per row that has one).
    """
    seen: dict[str, str] = {}
    out: dict[tuple[str, int], dict] = {}
    for ds in datasets:
        rows = (
            ds.filter(lambda r: r["_error"] == "" and r["_id"] != "")
            .select_columns(["_path", "_row", "_id"])
            .take_all()
        )
        for r in sorted(rows, key=lambda r: (r["_path"], int(r["_row"]))):
            where = f"{Path(r['_path']).name}:{int(r['_row'])}"
            if r["_id"] in seen:
                out[(r["_path"], int(r["_row"]))] = {
                    "file": r["_path"],
                    "row": int(r["_row"]),
                    "reason": f"{field}: duplicate id {r['_id']} (first at {seen[r['_id']]})",
                    "raw": None,
                }
            else:
                seen[r["_id"]] = where
    return out


def _not_in(keys: dict[tuple[str, int], Any]) -> Any:
    drop = set(keys)

    def keep(row: dict[str, Any]) -> bool:
        return (row["_path"], int(row["_row"])) not in drop

    return keep


@dataclass
class PreparedData:
    """Tokenised, materialised datasets ready for Ray Train, with the bookkeeping."""

    train: Any
    validation: Any
    labels: list[str] | None
    counts: dict[str, int] = field(default_factory=dict)
    rejected_path: str | None = None


def _is_ok(row: dict[str, Any]) -> bool:
    return row["_error"] == ""


def prepare_datasets(
    task: Task,
    data: DataOptions,
    tokenizer_path: str,
    run_dir: Path,
    trust_remote_code: bool = False,
    progress: Any = print,
    image_config: dict[str, Any] | None = None,
) -> PreparedData:
    """Run the preprocessing pipeline; sets ``task``'s label set when it is inferred.

    ``image_config`` (multimodal) makes the tokenizer actors also decode each row's image into
    ``pixel_values`` (see ``TokenizeRows``).

    Runs with Ray Data's ``preserve_order``: the materialised training set then has the same
    blocks in the same order on every run of the same config, which is what lets a resumed
    run (even one started by a new driver) skip exactly the rows it already trained on.
    """
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True
    try:
        return _prepare(
            task, data, tokenizer_path, run_dir, trust_remote_code, progress, image_config
        )
    finally:
        options.preserve_order = saved


def _prepare(
    task: Task,
    data: DataOptions,
    tokenizer_path: str,
    run_dir: Path,
    trust_remote_code: bool,
    progress: Any,
    image_config: dict[str, Any] | None = None,
) -> PreparedData:
    train_paths = resolve_paths(data.train, "train")
    val_paths = resolve_paths(data.validation, "validation") if data.validation else None
    split = None if val_paths else data.validation_fraction

    spec = task.spec()
    validated = (
        read_rows(train_paths)
        .map_batches(
            validate_batch,
            fn_kwargs={
                "task_spec": spec,
                "split_fraction": split,
                "split_seed": data.split_seed,
                "id_field": data.id_field,
            },
            batch_format="numpy",
        )
        .materialize()
    )
    if task.uses_label_set and task.labels is None:
        found: set[str] = set()
        for row in (
            validated.filter(_is_ok).map_batches(_unique_labels, batch_format="numpy").take_all()
        ):
            found.add(str(row["label"]))
        if len(found) < 2:
            raise DataError(
                f"found {len(found)} distinct label(s) in {data.train}; "
                f"'{task.name}' needs at least 2 (or set task.labels)"
            )
        # Every training label is in the inferred set by construction, so only the validation
        # file (read below with the set in its spec) can still hold an unknown label.
        task.set_labels(task.sort_labels(found))
        progress(f"[taskray] labels inferred from the training data: {task.labels}")
        spec = task.spec()

    if val_paths:
        val_validated = (
            read_rows(val_paths)
            .map_batches(
                validate_batch,
                fn_kwargs={"task_spec": spec, "id_field": data.id_field},
                batch_format="numpy",
            )
            .materialize()
        )
        train_valid = validated.filter(_is_ok)
        val_valid = val_validated.filter(_is_ok)
        all_validated = [validated, val_validated]
    else:
        train_valid = validated.filter(lambda r: r["_error"] == "" and r["_split"] == "train")
        val_valid = validated.filter(lambda r: r["_error"] == "" and r["_split"] == "validation")
        all_validated = [validated]

    rejected: list[dict[str, Any]] = []
    total = 0
    for ds in all_validated:
        total += ds.count()
        rejected.extend(
            {"file": r["_path"], "row": int(r["_row"]), "reason": r["_error"], "raw": r["_raw"]}
            for r in ds.filter(lambda r: r["_error"] != "").take_all()
        )
    duplicates = find_duplicate_ids(all_validated, data.id_field)
    if duplicates:
        rejected.extend(duplicates.values())
        train_valid = train_valid.filter(_not_in(duplicates))
        val_valid = val_valid.filter(_not_in(duplicates))

    tokenizer_kwargs = {
        "task_spec": spec,
        "tokenizer_path": tokenizer_path,
        "trust_remote_code": trust_remote_code,
        "image_config": image_config,
    }
    import ray.data

    def tokenize(ds: Any) -> Any:
        return ds.map_batches(
            TokenizeRows,
            fn_constructor_kwargs=tokenizer_kwargs,
            compute=ray.data.ActorPoolStrategy(size=data.tokenizer_actors),
            batch_format="numpy",
            batch_size=256,
        ).materialize()

    train_tok = tokenize(train_valid)
    val_tok = tokenize(val_valid)
    for ds in (train_tok, val_tok):
        rejected.extend(
            {"file": r["_path"], "row": int(r["_row"]), "reason": r["_error"], "raw": None}
            for r in ds.filter(lambda r: r["_error"] != "")
            .select_columns(["_path", "_row", "_error"])
            .take_all()
        )
    # Materialise after the last transform: Ray Train workers hold the CPUs while training, so
    # any operator still to run would wait for a CPU forever.
    train_final = train_tok.filter(_is_ok).drop_columns(["_error", "_path"])
    sequences = None
    if data.packing and task.model_kind == "causal_lm":
        sequences = train_final.count()
        train_final = train_final.map_batches(
            pack_batch,
            fn_kwargs={"max_length": task.max_length},
            batch_size=data.packing_window,
            batch_format="numpy",
        )
    train_final = train_final.materialize()
    val_final = val_tok.filter(_is_ok).drop_columns(["_error", "_path"]).materialize()

    run_dir.mkdir(parents=True, exist_ok=True)
    rejected_path = run_dir / "rejected.jsonl"
    rejected.sort(key=lambda r: (r["file"], r["row"]))
    with rejected_path.open("w") as f:
        for r in rejected:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = {
        "read": total,
        "rejected": len(rejected),
        "train": train_final.count(),
        "validation": val_final.count(),
    }
    if sequences is not None:
        lens = [list(r["seq_lens"]) for r in train_final.select_columns(["seq_lens"]).take_all()]
        counts["train_sequences"] = sequences
        efficiency = packing_efficiency(lens, task.max_length)
        progress(
            f"[taskray] packed {sequences} sequences into {counts['train']} rows of "
            f"{task.max_length} tokens (efficiency {efficiency:.3f})"
        )
    progress(
        f"[taskray] rows: {counts['read']} read, {counts['train']} train, "
        f"{counts['validation']} validation, {counts['rejected']} rejected"
        + (f" (see {rejected_path})" if rejected else "")
    )
    fraction = len(rejected) / max(total, 1)
    if fraction > data.max_rejected_fraction:
        raise DataError(
            f"{len(rejected)} of {total} rows ({fraction:.1%}) were rejected, more than "
            f"data.max_rejected_fraction={data.max_rejected_fraction:g}; "
            f"see {rejected_path} for each row and reason"
        )
    if counts["train"] == 0:
        raise DataError(f"no valid training rows in {data.train}; see {rejected_path}")
    if counts["validation"] == 0:
        raise DataError("no validation rows; pass --validation FILE or raise validation_fraction")
    return PreparedData(
        train=train_final,
        validation=val_final,
        labels=task.labels,
        counts=counts,
        rejected_path=str(rejected_path),
    )
