"""Retrieval quality (`taskray evaluate-retrieval`) and RAG fine-tuning rows from an index
(`taskray rag-data`). Both run in the driver process: a few thousand questions embed in
seconds, and a local-mode index admits one process anyway.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from actors.preprocess import parse_raw, raw_rows
from actors.vectorstore import QdrantOptions
from cluster.data import DataError
from serve.retriever import RetrieverCore
from tasks import RowError, get_task
from tasks.base import _pydantic_reason
from tasks.metrics import retrieval_scores
from tasks.rag import Passage


class QuestionRow(BaseModel):
    """A question with the ids of the documents that answer it (and, for RAG data, its answer
    and optionally the gold passages themselves)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    question: str = Field(min_length=1)
    answer: str | None = None
    relevant_ids: list[str] = Field(default_factory=list, description="document ids")
    passages: list[Passage] = Field(default_factory=list, description="gold passages")

    @field_validator("relevant_ids", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        if isinstance(value, str | int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("question")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value


def read_questions(path: str) -> tuple[list[tuple[int, QuestionRow]], list[dict[str, Any]]]:
    """``([(row number, row)], rejected)`` from a JSONL/JSON/CSV/Parquet file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"questions file not found: {p}")
    rows, rejected = [], []
    for number, raw in raw_rows(p.read_bytes(), str(p)):
        try:
            data = parse_raw(raw)
            if not isinstance(data, dict):
                raise RowError("row", f"expected a JSON object, got {type(data).__name__}")
            try:
                rows.append((number, QuestionRow.model_validate(data)))
            except ValidationError as err:
                raise _pydantic_reason(err) from None
        except RowError as err:
            rejected.append({"file": str(p), "row": number, "reason": str(err)})
    return rows, rejected


def evaluate_retrieval(
    questions: str,
    qdrant: QdrantOptions,
    model: str | None = None,
    k: int = 5,
    device: str = "auto",
) -> dict[str, Any]:
    """recall@k and MRR of document retrieval: the ranking is the ``k`` best distinct
    documents (each document's best chunk, Qdrant's grouping by ``doc_id``)."""
    rows, rejected = read_questions(questions)
    usable = []
    for number, row in rows:
        if row.relevant_ids:
            usable.append((number, row))
        else:
            rejected.append(
                {"file": questions, "row": number, "reason": "relevant_ids: missing field"}
            )
    if not usable:
        raise DataError(f"no usable questions in {questions} (each needs relevant_ids)")
    t = time.perf_counter()
    core = RetrieverCore(qdrant, model, default_k=k, max_k=max(k, 50), device=device)
    try:
        results = core.retrieve_many([r.question for _, r in usable], k=k, distinct_documents=True)
        model_name = core.embedder.model_name
    finally:
        core.close()
    ranked = [[p["doc_id"] for p in hits] for hits in results]
    gold = [r.relevant_ids for _, r in usable]
    scores = retrieval_scores(ranked, gold, k=k)
    misses = [
        {"row": number, "question": row.question, "relevant_ids": row.relevant_ids, "top": ids}
        for (number, row), ids in zip(usable, ranked, strict=True)
        if not set(row.relevant_ids) & set(ids)
    ]
    return {
        "collection": qdrant.collection,
        "model": model_name,
        "questions": len(usable),
        "k": k,
        "metrics": scores,
        "misses": misses,
        "rejected": rejected,
        "seconds": time.perf_counter() - t,
    }


def build_rag_rows(
    questions: str,
    qdrant: QdrantOptions,
    output: str,
    model: str | None = None,
    k: int = 8,
    distractors: int = 3,
    device: str = "auto",
) -> dict[str, Any]:
    """Write ``rag`` training rows (``tasks.rag.RagRow``) to ``output``: the gold passages (given
    in the row, or the best chunk of each ``relevant_ids`` document) and up to ``distractors``
    hard negatives (the best-ranked retrieved chunks of other documents). Rows that cannot be
    built go to ``<output stem>.rejected.jsonl``."""
    rows, rejected = read_questions(questions)
    task = get_task("rag")
    out_rows: list[dict[str, Any]] = []
    core = RetrieverCore(qdrant, model, default_k=k, max_k=max(k, 50), device=device)
    try:
        vectors = core.embedder.embed([r.question for _, r in rows], kind="query")
        for (number, row), vector in zip(rows, vectors, strict=True):
            try:
                out_rows.append(_rag_row(core, row, vector, k, distractors, task))
            except RowError as err:
                rejected.append({"file": questions, "row": number, "reason": str(err)})
    finally:
        core.close()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for r in out_rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    rejected_path = out.with_name(out.stem + ".rejected.jsonl")
    with rejected_path.open("w") as f:
        for r in rejected:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {
        "rows": len(out_rows),
        "rejected": len(rejected),
        "output": str(out),
        "rejected_path": str(rejected_path),
    }


def _passage(hit: dict[str, Any]) -> dict[str, Any]:
    p = {"id": hit["id"], "text": hit["text"]}
    if hit.get("title"):
        p["title"] = hit["title"]
    return p


def _rag_row(
    core: RetrieverCore, row: QuestionRow, vector: Any, k: int, distractors: int, task: Any
) -> dict[str, Any]:
    if row.answer is None or not row.answer.strip():
        raise RowError("answer", "missing field (RAG training rows need the answer)")
    if row.passages:
        gold = [p.model_dump(exclude_none=True) for p in row.passages]
    elif row.relevant_ids:
        gold = []
        for doc_id in row.relevant_ids:
            best = core.search_vector(vector, k=1, filters={"doc_id": doc_id})
            if not best:
                raise RowError("relevant_ids", f"document '{doc_id}' is not in the index")
            gold.append(_passage(best[0]))
    else:
        raise RowError("relevant_ids", "give relevant_ids or passages (the gold evidence)")
    gold_ids = {p["id"] for p in gold}
    gold_texts = {p["text"] for p in gold}
    negatives = [
        _passage(hit)
        for hit in core.search_vector(vector, k=k)
        if hit["doc_id"] not in set(row.relevant_ids)
        and hit["id"] not in gold_ids
        and hit["text"] not in gold_texts
    ][:distractors]
    return task.validate(
        {
            "question": row.question,
            "answer": row.answer,
            "passages": gold,
            "distractors": negatives,
        }
    )
