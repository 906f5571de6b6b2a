"""Document UDFs that Ray Data runs on batches (text files → rows, validation, chunking) and a
plain-Python indexing loop for small corpora and tests. The pipeline lives in ``cluster.index``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from actors.preprocess import parse_raw
from tasks import RowError
from tasks.chunking import chunk_document, embedding_text, validate_document

log = logging.getLogger("taskray")

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
_HEADING = re.compile(r"^\s{0,3}#\s+(.+?)\s*#*\s*$", re.MULTILINE)


def text_file_row(data: bytes, path: str, root: str) -> str:
    """A plain-text or Markdown file as one document row (JSON text): id = the path relative to
    ``root`` (POSIX separators), title = a Markdown file's first ``# heading``.

    Undecodable bytes become a NUL-prefixed reason, which validation reports for the file.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"\x00not valid UTF-8: {err.reason} at byte {err.start}"
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    if rel == ".":
        rel = os.path.basename(path)
    row: dict[str, Any] = {"id": rel.replace(os.sep, "/"), "text": text.lstrip("\ufeff")}
    if path.lower().endswith((".md", ".markdown")):
        heading = _HEADING.search(text)
        if heading:
            row["title"] = heading.group(1)
    return json.dumps(row, ensure_ascii=False)


def text_files_to_rows(batch: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """``read_binary_files(include_paths=True)`` output → ``_path``/``_row``/``_raw`` rows."""
    paths = [str(p) for p in batch["path"]]
    # Ray drops the leading "/" of local paths on some filesystems; put it back for relpath.
    paths = [p if os.path.isabs(p) or "://" in p else "/" + p for p in paths]
    raws = [text_file_row(bytes(b), p, root) for b, p in zip(batch["bytes"], paths, strict=True)]
    return {
        "_path": np.array(paths, dtype=object),
        "_row": np.ones(len(paths), dtype=np.int64),
        "_raw": np.array(raws, dtype=object),
    }


def validate_documents(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate raw document rows: adds ``_json`` (normalised), ``_id`` and ``_error``."""
    out_json, ids, errors = [], [], []
    for raw in batch["_raw"]:
        try:
            doc = validate_document(parse_raw(str(raw)))
            out_json.append(json.dumps(doc, ensure_ascii=False))
            ids.append(doc["id"])
            errors.append("")
        except RowError as err:
            out_json.append("")
            ids.append("")
            errors.append(str(err))
    return {
        "_path": batch["_path"],
        "_row": batch["_row"],
        "_raw": batch["_raw"],
        "_json": np.array(out_json, dtype=object),
        "_id": np.array(ids, dtype=object),
        "_error": np.array(errors, dtype=object),
    }


def keep_rows(batch: dict[str, np.ndarray], drop: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    """Valid rows whose ``(file, row)`` is not in ``drop`` (duplicates found on the driver)."""
    dropped = {(str(p), int(r)) for p, r in drop}
    mask = np.array(
        [
            not e and (str(p), int(r)) not in dropped
            for p, r, e in zip(batch["_path"], batch["_row"], batch["_error"], strict=True)
        ],
        dtype=bool,
    )
    return {k: batch[k][mask] for k in ("_path", "_row", "_json")}


@lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    # Cached per worker process: Ray reuses task workers, so the tokenizer loads once each.
    from actors.modeling import resolve_model_path
    from actors.preprocess import load_tokenizer

    return load_tokenizer(resolve_model_path(path))


def chunk_batch(
    batch: dict[str, np.ndarray],
    tokenizer_path: str,
    max_tokens: int,
    overlap: int,
    title_in_embedding: bool = True,
) -> dict[str, np.ndarray]:
    """Validated documents → one row per chunk: ``_doc_id``, ``_chunk_index``, ``_n_chunks``
    (the document's total, for deleting stale chunks), ``_payload`` (the chunk as JSON, so
    documents with different metadata keys share one Arrow schema), ``_embed_text``, ``_path``,
    ``_row`` and ``_error`` (a document the tokenizer finds no tokens in: one row, reported)."""
    tokenizer = _tokenizer(tokenizer_path)
    names = ("_doc_id", "_chunk_index", "_n_chunks", "_payload", "_embed_text", "_path", "_row")
    cols: dict[str, list[Any]] = {k: [] for k in (*names, "_error")}
    for path, row_no, raw in zip(batch["_path"], batch["_row"], batch["_json"], strict=True):
        doc = json.loads(str(raw))
        chunks = chunk_document(doc, tokenizer, max_tokens, overlap)
        rows = [
            (
                doc["id"],
                c["chunk_index"],
                len(chunks),
                json.dumps(c, ensure_ascii=False),
                embedding_text(c, title_in_embedding),
                path,
                row_no,
                "",
            )
            for c in chunks
        ] or [(doc["id"], 0, 0, "", "", path, row_no, "text: no tokens for the embedder")]
        for values in rows:
            for key, value in zip(cols, values, strict=True):
                cols[key].append(value)
    return {
        "_doc_id": np.array(cols["_doc_id"], dtype=object),
        "_chunk_index": np.array(cols["_chunk_index"], dtype=np.int64),
        "_n_chunks": np.array(cols["_n_chunks"], dtype=np.int64),
        "_payload": np.array(cols["_payload"], dtype=object),
        "_embed_text": np.array(cols["_embed_text"], dtype=object),
        "_path": np.array([str(p) for p in cols["_path"]], dtype=object),
        "_row": np.array(cols["_row"], dtype=np.int64),
        "_error": np.array(cols["_error"], dtype=object),
    }


def index_documents(
    docs: Iterable[Mapping[str, Any]],
    embedder: Any,
    store: Any,
    max_tokens: int = 128,
    overlap: int = 32,
    title_in_embedding: bool = True,
    prune: bool = False,
) -> dict[str, int]:
    """Index documents in this process (no Ray): validate, chunk with the embedder's tokenizer,
    embed, upsert, delete stale chunks and, with ``prune``, every indexed document that is not
    in ``docs``. For small corpora, notebooks and tests; the Ray Data job (``taskray index``)
    does the same at scale. Invalid documents raise ``RowError``; a collection built with
    another model raises ``StoreError`` before anything is embedded."""
    store.check_model(embedder.model_name, embedder.dimension)
    chunks: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for doc in docs:
        clean = validate_document(doc)
        doc_chunks = chunk_document(clean, embedder.tokenizer, max_tokens, overlap)
        counts[clean["id"]] = len(doc_chunks)
        chunks.extend(doc_chunks)
    vectors = embedder.embed([embedding_text(c, title_in_embedding) for c in chunks])
    store.ensure_collection(
        embedder.dimension,
        embedder.model_name,
        {"chunk_max_tokens": max_tokens, "chunk_overlap": overlap},
    )
    store.upsert_chunks(chunks, vectors)
    store.delete_stale_chunks(counts)
    pruned = len(store.prune_documents(counts)) if prune else 0
    return {"documents": len(counts), "chunks": len(chunks), "pruned": pruned}
