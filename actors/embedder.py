"""Sentence embeddings with sentence-transformers: L2-normalised, batched, on GPU when present.

``Embedder`` is the plain object (the retriever deployment and the driver-side tools hold one);
``EmbedBatch`` is the Ray Data ``map_batches`` class that holds one per actor of the pool.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from pydantic import Field

from actors.config import Strict
from actors.modeling import MINILM_ALIASES, resolve_model_path

log = logging.getLogger("taskray")

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"


class EmbedderError(ValueError):
    """The embedding model cannot be loaded or used; the message says which and why."""


class EmbedderOptions(Strict):
    """Which sentence-transformers model embeds chunks and queries, and where it runs."""

    model: str = Field(default=DEFAULT_EMBEDDER, description="model name or local directory")
    batch_size: int = Field(default=64, ge=1, description="texts per forward pass")
    device: str = Field(default="auto", description="'auto' (cuda when present), 'cpu', 'cuda:0'")
    trust_remote_code: bool = False


def canonical_model_name(name_or_path: str) -> str:
    """The name recorded with a collection: aliases of the shipped MiniLM collapse to one name,
    so an index built with ``all-MiniLM-L6-v2`` is served with ``sentence-transformers/...``."""
    if name_or_path.lower() in MINILM_ALIASES:
        return DEFAULT_EMBEDDER
    return name_or_path


def pick_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible (inside a Ray actor: one it was given)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """A sentence-transformers model that returns L2-normalised float32 vectors.

    ``kind="query"`` uses the model's query prompt and ``"document"`` its document prompt where
    the model defines them (E5, BGE...); for all-MiniLM-L6-v2 both are the plain text.
    """

    def __init__(
        self,
        model: str = DEFAULT_EMBEDDER,
        device: str = "auto",
        batch_size: int = 64,
        trust_remote_code: bool = False,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_name = canonical_model_name(model)
        self.device = pick_device(device)
        self.batch_size = batch_size
        path = resolve_model_path(model)
        try:
            self.model = SentenceTransformer(
                path, device=self.device, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EmbedderError(
                f"cannot load embedding model '{model}' ({first}); pass a local directory or a "
                "Hugging Face name that is in the local cache"
            ) from None
        dimension = self.model.get_embedding_dimension()
        if not dimension:
            raise EmbedderError(f"embedding model '{model}' does not report its dimension")
        self.dimension = int(dimension)
        log.info("embedder %s (%d dims) on %s", self.model_name, self.dimension, self.device)

    @property
    def max_seq_length(self) -> int | None:
        """Tokens the model reads per text (longer texts are truncated by sentence-transformers)."""
        return self.model.max_seq_length

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (chunk with it so chunks fit ``max_seq_length``)."""
        return self.model.tokenizer

    def embed(
        self, texts: list[str], kind: Literal["query", "document"] = "document"
    ) -> np.ndarray:
        """``[len(texts), dimension]`` float32, each row of unit length."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        encode = self.model.encode_query if kind == "query" else self.model.encode_document
        vectors = encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


class EmbedBatch:
    """Ray Data actor UDF: loads the embedder once per actor and adds a ``_vector`` column.

    Rows whose ``_error`` is set (a document the chunker could not cut) pass through with a zero
    vector, so the driver can report them without a second pass over the data.
    """

    def __init__(
        self,
        model: str = DEFAULT_EMBEDDER,
        device: str = "auto",
        batch_size: int = 64,
        trust_remote_code: bool = False,
        text_column: str = "_embed_text",
    ) -> None:
        self.embedder = Embedder(model, device, batch_size, trust_remote_code)
        self.text_column = text_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = batch[self.text_column]
        errors = batch.get("_error")
        ok = (
            np.ones(len(texts), dtype=bool)
            if errors is None
            else np.array([not e for e in errors], dtype=bool)
        )
        vectors = np.zeros((len(texts), self.embedder.dimension), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.embedder.embed([str(t) for t in texts[ok]], kind="document")
        return {**batch, "_vector": vectors}
