"""Documents for retrieval and their token-aware chunks (pure Python: the tokenizer is passed in).

A document is ``{"id", "text", "title"?, "url"?, "metadata"?}``. It is cut into windows of at most
``max_tokens`` tokens of the embedding model's tokenizer, overlapping by about ``overlap`` tokens
(cuts fall between words, so the overlap varies, up to twice ``overlap``),
so that every chunk fits the embedder without being truncated. Each chunk keeps its document id,
its index, and the character offsets ``start``/``end`` into the original text: the chunk text
is exactly ``text[start:end]``, so a citation can point back into the source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.base import RowError, TaskError, _pydantic_reason


class Document(BaseModel):
    """One document to index."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str = Field(min_length=1, max_length=512, description="unique id (a citation names it)")
    text: str = Field(description="the text; chunked and embedded")
    title: str | None = Field(default=None, description="shown in prompts, embedded with chunks")
    url: str | None = None
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="filterable fields, e.g. {'lang': 'en'}"
    )

    @field_validator("id", mode="before")
    @classmethod
    def _int_id(cls, value: Any) -> Any:
        # Integer ids are common in exported corpora; they name the same document as text.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("text")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value


def validate_document(row: Any) -> dict[str, Any]:
    """Check one document row; return its normalised form or raise ``RowError``."""
    if not isinstance(row, Mapping):
        raise RowError("row", f"expected a JSON object, got {type(row).__name__}")
    try:
        doc = Document.model_validate(dict(row))
    except ValidationError as err:
        raise _pydantic_reason(err) from None
    return doc.model_dump()


def check_window(max_tokens: int, overlap: int) -> None:
    """Refuse window settings that cannot make progress."""
    if max_tokens < 8:
        raise TaskError(f"chunk max_tokens={max_tokens} is too small (use at least 8)")
    if overlap < 0 or overlap > max_tokens // 2:
        raise TaskError(
            f"chunk overlap={overlap} must be between 0 and half of max_tokens={max_tokens}"
        )


def token_windows(
    text: str, tokenizer: Any, max_tokens: int, overlap: int
) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of overlapping windows of at most ``max_tokens`` tokens.

    The fast tokenizer's offset mapping and word ids place the cuts. Hugging Face's own
    overflow windows (``return_overflowing_tokens`` with ``stride``) cut inside words, which
    leaves chunks starting with a word fragment; here a window ends before the word it would
    split and the next one starts at a word start, unless a single word is longer than a window.
    """
    check_window(max_tokens, overlap)
    if not getattr(tokenizer, "is_fast", False):
        raise TaskError("chunking needs a fast tokenizer (offset mapping); got a slow one")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets: Sequence[tuple[int, int]] = enc["offset_mapping"]
    words = enc.word_ids()
    n = len(offsets)
    if n == 0:
        return []
    # Token indices where a new word begins (special/unknown word ids count as their own word).
    word_start = [i == 0 or words[i] is None or words[i] != words[i - 1] for i in range(n)]
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + max_tokens, n)
        if end < n and not word_start[end]:
            back = next((j for j in range(end - 1, start, -1) if word_start[j]), None)
            if back is not None:
                end = back
        spans.append((offsets[start][0], offsets[end - 1][1]))
        if end >= n:
            return spans
        # Step back ~overlap tokens to a word start, but by at most 2 * overlap (a long word
        # there would otherwise shrink the stride); else forward to the next word start.
        target = max(end - overlap, start + 1)
        floor = max(end - 2 * overlap, start + 1)
        nxt = next((j for j in range(target, floor - 1, -1) if word_start[j]), None)
        if nxt is None:
            nxt = next((j for j in range(target, end) if word_start[j]), end)
        start = nxt


def chunk_document(
    doc: Mapping[str, Any], tokenizer: Any, max_tokens: int = 128, overlap: int = 32
) -> list[dict[str, Any]]:
    """A validated document's chunks: ``doc_id``, ``chunk_index``, ``start``, ``end``, ``text``
    (``== doc["text"][start:end]``), ``title``, ``url`` and ``metadata``."""
    text = doc["text"]
    return [
        {
            "doc_id": doc["id"],
            "chunk_index": i,
            "start": start,
            "end": end,
            "text": text[start:end],
            "title": doc.get("title"),
            "url": doc.get("url"),
            "metadata": dict(doc.get("metadata") or {}),
        }
        for i, (start, end) in enumerate(token_windows(text, tokenizer, max_tokens, overlap))
    ]


def embedding_text(chunk: Mapping[str, Any], with_title: bool = True) -> str:
    """What the embedder sees for a chunk: the title line gives short chunks their topic."""
    title = chunk.get("title")
    return f"{title}\n{chunk['text']}" if with_title and title else str(chunk["text"])


def passage_id(doc_id: str, chunk_index: int) -> str:
    """The id a chunk is cited by in RAG prompts (``doc-7#2``)."""
    return f"{doc_id}#{chunk_index}"
