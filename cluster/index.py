"""`taskray index`: documents → Ray Data (read, validate, chunk, embed in an actor pool) → Qdrant.

Every document is either indexed or written to ``<output_dir>/rejected.jsonl`` with its file,
row and reason (a later duplicate of an id included); past ``max_rejected_fraction`` the job
stops before touching the index. Points are upserted from the driver, because a local-mode
folder admits one process (the driver holds it for the whole job and closes it at the end);
a Qdrant server would take upserts from the actors as well, but one writer keeps the
stale-chunk deletes simple and the driver is not the bottleneck next to embedding.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from actors.config import Strict
from actors.embedder import EmbedBatch, EmbedderOptions, canonical_model_name
from actors.indexing import TEXT_SUFFIXES, chunk_batch, keep_rows, validate_documents
from actors.vectorstore import QdrantOptions, VectorStore
from cluster.config import ConfigError, RayOptions
from cluster.console import progress_bar
from cluster.data import DATA_SUFFIXES, DataError, read_rows

log = logging.getLogger("taskray")


class ChunkingOptions(Strict):
    """Token windows of the embedder's tokenizer (so no chunk is truncated when embedded)."""

    max_tokens: int = Field(default=128, ge=8, le=8192, description="tokens per chunk at most")
    overlap: int = Field(default=32, ge=0, description="tokens shared by neighbouring chunks")
    title_in_embedding: bool = Field(
        default=True, description="embed 'title\\ntext' (the stored chunk text stays exact)"
    )
    tokenizer: str | None = Field(default=None, description="default: the embedder's")

    @model_validator(mode="after")
    def _overlap_fits(self) -> ChunkingOptions:
        if self.overlap > self.max_tokens // 2:
            raise ValueError(f"overlap must be at most half of max_tokens ({self.max_tokens})")
        return self


class IndexEmbedderOptions(EmbedderOptions):
    """The embedder and its Ray Data actor pool."""

    actors: int = Field(default=1, ge=1, description="embedding actors (map_batches concurrency)")
    cpus_per_actor: float = Field(default=1, gt=0)
    gpus_per_actor: float = Field(default=0, ge=0, description="e.g. 1 (or 0.5 to share a GPU)")


class IndexConfig(Strict):
    """`taskray index`: where the documents are, how they are chunked and embedded, where the
    index goes."""

    input: str = Field(description="JSONL/JSON/Parquet/CSV of documents, .txt/.md, or a folder")
    output_dir: str = Field(default="runs/index", description="rejected.jsonl and index.json")
    max_rejected_fraction: float = Field(default=0.1, ge=0, le=1)
    prune: bool = Field(
        default=False, description="delete documents that are in the index but not in the input"
    )
    chunking: ChunkingOptions = ChunkingOptions()
    embedder: IndexEmbedderOptions = IndexEmbedderOptions()
    qdrant: QdrantOptions = QdrantOptions()
    ray: RayOptions = RayOptions()


@dataclass
class IndexOutcome:
    """What an indexing run did."""

    documents: int
    chunks: int
    rejected: int
    points: int
    seconds: float
    collection: str
    location: str
    created: bool
    pruned: int = 0
    rejected_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def resolve_documents(spec: str) -> tuple[list[str], list[str], str]:
    """``(row files, text files, root)``: a file, or every document file under a folder (hidden
    files and folders skipped). Text-file ids are paths relative to ``root``."""
    if "://" in spec:
        lower = spec.lower()
        if lower.endswith(TEXT_SUFFIXES):
            return [], [spec], spec.rsplit("/", 1)[0]
        return [spec], [], ""
    path = Path(spec).expanduser()
    kinds = DATA_SUFFIXES + TEXT_SUFFIXES
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in kinds:
            raise ConfigError(f"input file {path} has an unsupported type (use {', '.join(kinds)})")
        resolved = str(path.resolve())
        if suffix in TEXT_SUFFIXES:
            return [], [resolved], str(path.resolve().parent)
        return [resolved], [], str(path.resolve().parent)
    if path.is_dir():
        root = path.resolve()
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in kinds
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise ConfigError(f"input folder {path} holds no {', '.join(kinds)} files")
        rows = [str(p) for p in files if p.suffix.lower() in DATA_SUFFIXES]
        texts = [str(p) for p in files if p.suffix.lower() in TEXT_SUFFIXES]
        return rows, texts, str(root)
    raise ConfigError(f"input not found: {path} (check the path or pass --input PATH)")


def read_documents(row_files: list[str], text_files: list[str], root: str) -> Any:
    """Raw document rows (``_path``, ``_row``, ``_raw``) from both kinds of files."""
    import ray.data

    from actors.indexing import text_files_to_rows

    parts = []
    if row_files:
        parts.append(read_rows(row_files))
    if text_files:
        parts.append(
            ray.data.read_binary_files(text_files, include_paths=True).map_batches(
                text_files_to_rows, fn_kwargs={"root": root}, batch_format="numpy"
            )
        )
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _errors_only(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mask = np.array([bool(e) for e in batch["_error"]], dtype=bool)
    return {k: batch[k][mask] for k in ("_path", "_row", "_raw", "_error")}


def _worker_model_arg(name: str) -> str:
    """A model argument Ray workers can resolve: local folders absolute (workers do not share
    the driver's working directory), names (and the MiniLM alias) as they are."""
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def _write_rejected(path: Path, rejected: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rejected.sort(key=lambda r: (str(r["file"]), int(r["row"])))
    with path.open("w") as f:
        for r in rejected:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def run_indexing(
    cfg: IndexConfig, progress: Any = print, show_progress: bool = True
) -> IndexOutcome:
    """Run the indexing job; the store is closed when this returns (or raises)."""
    import ray.data

    from cluster.runtime import connect

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    row_files, text_files, root = resolve_documents(cfg.input)
    out_dir = Path(cfg.output_dir)
    rejected_path = out_dir / "rejected.jsonl"
    model_name = canonical_model_name(cfg.embedder.model)
    # Open first: a folder held by a running retriever, or an index built with another model,
    # fails here in a second rather than after the corpus is embedded.
    store = VectorStore.open(cfg.qdrant)
    try:
        store.check_model(model_name)
        connect(cfg.ray.address, cfg.ray.num_cpus, quiet=True)
        progress(
            f"[taskray] indexing {cfg.input} ({len(row_files)} row files, {len(text_files)} "
            f"text files) into {cfg.qdrant.describe()} with {model_name}"
        )

        t = time.perf_counter()
        validated = (
            read_documents(row_files, text_files, root)
            .map_batches(validate_documents, batch_format="numpy")
            .materialize()
        )
        # Only ids and row numbers come to the driver (not texts): enough to find duplicates.
        book = validated.select_columns(["_path", "_row", "_id", "_error"]).take_all()
        rejected: list[dict[str, Any]] = [
            {"file": r["_path"], "row": int(r["_row"]), "reason": r["_error"], "raw": r["_raw"]}
            for r in validated.map_batches(_errors_only, batch_format="numpy").take_all()
        ]
        # The same id twice would make two documents overwrite each other's chunks; the first
        # (by file, row) is indexed and every later one is reported.
        first_seen: dict[str, tuple[str, int]] = {}
        duplicates: list[tuple[str, int]] = []
        for r in sorted(book, key=lambda r: (str(r["_path"]), int(r["_row"]))):
            if r["_error"]:
                continue
            key = (str(r["_path"]), int(r["_row"]))
            if r["_id"] in first_seen:
                f0, r0 = first_seen[r["_id"]]
                duplicates.append(key)
                rejected.append(
                    {
                        "file": key[0],
                        "row": key[1],
                        "reason": f"id: duplicate id '{r['_id']}' (first in {f0} row {r0})",
                        "raw": None,
                    }
                )
            else:
                first_seen[r["_id"]] = key
        total = len(book)
        timings["read + validate"] = time.perf_counter() - t
        fraction = len(rejected) / max(total, 1)
        if fraction > cfg.max_rejected_fraction:
            _write_rejected(rejected_path, rejected)
            raise DataError(
                f"{len(rejected)} of {total} documents ({fraction:.1%}) were rejected, more "
                f"than max_rejected_fraction={cfg.max_rejected_fraction:g}; see {rejected_path}"
            )
        if not first_seen:
            _write_rejected(rejected_path, rejected)
            raise DataError(f"no valid documents in {cfg.input}; see {rejected_path}")

        model_arg = _worker_model_arg(cfg.embedder.model)
        embedded = (
            validated.map_batches(keep_rows, fn_kwargs={"drop": duplicates}, batch_format="numpy")
            .map_batches(
                chunk_batch,
                fn_kwargs={
                    "tokenizer_path": _worker_model_arg(cfg.chunking.tokenizer or model_arg),
                    "max_tokens": cfg.chunking.max_tokens,
                    "overlap": cfg.chunking.overlap,
                    "title_in_embedding": cfg.chunking.title_in_embedding,
                },
                batch_format="numpy",
                batch_size=32,
            )
            .map_batches(
                EmbedBatch,
                fn_constructor_kwargs={
                    "model": model_arg,
                    "device": cfg.embedder.device,
                    "batch_size": cfg.embedder.batch_size,
                    "trust_remote_code": cfg.embedder.trust_remote_code,
                },
                compute=ray.data.ActorPoolStrategy(size=cfg.embedder.actors),
                num_cpus=cfg.embedder.cpus_per_actor,
                num_gpus=cfg.embedder.gpus_per_actor or None,
                batch_size=cfg.embedder.batch_size,
                batch_format="numpy",
                udf_modifying_row_count=False,
            )
        )

        t = time.perf_counter()
        created = False
        ready = False
        documents: set[str] = set()
        failed_docs: set[str] = set()
        chunks = 0
        bar = progress_bar(total - len(rejected), "index", "doc") if show_progress else None
        for batch in embedded.iter_batches(
            batch_size=cfg.qdrant.batch_size, batch_format="numpy", prefetch_batches=2
        ):
            ok = np.array([not e for e in batch["_error"]], dtype=bool)
            for path, row, err, doc in zip(
                batch["_path"][~ok],
                batch["_row"][~ok],
                batch["_error"][~ok],
                batch["_doc_id"][~ok],
                strict=True,
            ):
                rejected.append(
                    {"file": str(path), "row": int(row), "reason": str(err), "raw": None}
                )
                failed_docs.add(str(doc))
            if not ok.any():
                continue
            vectors = np.asarray(batch["_vector"][ok], dtype=np.float32)
            if not ready:
                created = store.ensure_collection(
                    int(vectors.shape[1]),
                    model_name,
                    {
                        "chunk_max_tokens": cfg.chunking.max_tokens,
                        "chunk_overlap": cfg.chunking.overlap,
                        "title_in_embedding": cfg.chunking.title_in_embedding,
                    },
                )
                ready = True
            payloads = [json.loads(str(p)) for p in batch["_payload"][ok]]
            chunks += store.upsert_chunks(payloads, vectors)
            counts = {
                str(d): int(n)
                for d, n in zip(batch["_doc_id"][ok], batch["_n_chunks"][ok], strict=True)
            }
            store.delete_stale_chunks(counts)
            if bar is not None:
                bar.update(len(set(counts) - documents))
                bar.set_postfix(chunks=chunks, refresh=False)
            documents.update(counts)
        if bar is not None:
            bar.close()
        timings["chunk + embed + upsert"] = time.perf_counter() - t

        pruned = 0
        if cfg.prune and ready:
            pruned = len(store.prune_documents(first_seen))
            progress(f"[taskray] pruned {pruned} documents no longer in {cfg.input}")
        points = store.count()
    finally:
        store.close()

    _write_rejected(rejected_path, rejected)
    seconds = time.perf_counter() - t_start
    outcome = IndexOutcome(
        documents=len(documents - failed_docs),
        chunks=chunks,
        rejected=len(rejected),
        points=points,
        seconds=seconds,
        collection=cfg.qdrant.collection,
        location=cfg.qdrant.location()[1],
        created=created,
        pruned=pruned,
        rejected_path=str(rejected_path),
        timings=timings,
    )
    (out_dir / "index.json").write_text(json.dumps(asdict(outcome), indent=2) + "\n")
    progress(
        f"[taskray] indexed {outcome.documents} documents as {chunks} chunks, "
        f"{outcome.rejected} rejected"
        + (f" (see {rejected_path})" if rejected else "")
        + f"; {points} points in {cfg.qdrant.describe()}; {seconds:.1f}s"
    )
    return outcome
