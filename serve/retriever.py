"""The retriever: an embedder plus a Qdrant collection, as plain Python and as a Serve deployment.

``RetrieverCore`` does the work and is what tests, ``taskray evaluate-retrieval`` and
``taskray rag-data`` use; ``Retriever`` wraps it as a Ray Serve deployment that batches the
embedding of concurrent requests (``@serve.batch``). Passages come back as dicts that are valid
``tasks.rag.Passage``s (``id`` = ``doc_id#chunk_index``, ``text``, ``title``, ``score``) plus
``doc_id``, ``chunk_index``, ``start``/``end`` (character offsets into the document), ``url``,
``metadata`` and ``point_id``.

With a local-mode index (a folder) run one replica: the folder admits one process at a time,
and the indexing job must have finished (closed it) before the deployment starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from ray import serve

from actors.embedder import Embedder, EmbedderError
from actors.vectorstore import QdrantOptions, StoreError, VectorStore

log = logging.getLogger("ray.serve")


def check_query(query: Any, max_chars: int = 2000) -> str:
    """A query as a non-empty string within ``max_chars`` (``ValueError`` naming the field)."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query: must be a non-empty string")
    if len(query) > max_chars:
        raise ValueError(f"query: {len(query)} characters, more than the limit of {max_chars}")
    return query


def check_k(k: Any, default_k: int, max_k: int) -> int:
    """``k`` or the default, as an integer in ``1..max_k``."""
    if k is None:
        return default_k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_k:
        raise ValueError(f"k: must be an integer from 1 to {max_k}")
    return k


def model_for(store: VectorStore, model: str | None) -> str:
    """The embedding model to query ``store`` with: the one given, else the one the collection
    records (so a retriever cannot silently use a different model than the index)."""
    if model:
        return model
    recorded = store.recorded_model()
    if recorded and recorded.get("embedding_model"):
        return str(recorded["embedding_model"])
    if not store.exists():
        raise StoreError(
            f"{store.options.describe()} does not exist; build it with `taskray index`"
        )
    raise StoreError(
        f"{store.options.describe()} records no embedding model; pass the model explicitly"
    )


class RetrieverCore:
    """Embedder + store; every method is synchronous plain Python.

    The embedder is ``embedder`` when given (already loaded), else ``model``, else the model the
    collection records; either way it must match the collection (``StoreError`` otherwise).
    """

    def __init__(
        self,
        qdrant: QdrantOptions | Mapping[str, Any],
        model: str | None = None,
        default_k: int = 5,
        max_k: int = 50,
        device: str = "auto",
        batch_size: int = 64,
        max_query_chars: int = 2000,
        embedder: Embedder | None = None,
    ) -> None:
        options = qdrant if isinstance(qdrant, QdrantOptions) else QdrantOptions(**qdrant)
        self.store = VectorStore.open(options)
        try:
            if embedder is None:
                name = model_for(self.store, model)
                embedder = Embedder(name, device=device, batch_size=batch_size)
            self.embedder = embedder
            if self.store.exists():
                self.store.check_model(self.embedder.model_name, self.embedder.dimension)
        except (StoreError, EmbedderError):
            self.store.close()
            raise
        self.default_k = default_k
        self.max_k = max_k
        self.max_query_chars = max_query_chars

    def embed(self, texts: list[str], kind: str = "document") -> list[list[float]]:
        """Normalised vectors as lists of floats."""
        return self.embedder.embed(list(texts), kind=kind).tolist()  # type: ignore[arg-type]

    def search_vector(
        self,
        vector: Any,
        k: int | None = None,
        filters: Mapping[str, Any] | None = None,
        distinct_documents: bool = False,
    ) -> list[dict[str, Any]]:
        """Top-k passages for an already-embedded query."""
        k = check_k(k, self.default_k, self.max_k)
        return self.store.search(vector, k, filters, distinct_documents)

    def retrieve(
        self,
        query: str,
        k: int | None = None,
        filters: Mapping[str, Any] | None = None,
        distinct_documents: bool = False,
    ) -> list[dict[str, Any]]:
        """Top-k passages for a query, best first, each with its ``score``."""
        query = check_query(query, self.max_query_chars)
        k = check_k(k, self.default_k, self.max_k)
        vector = self.embedder.embed([query], kind="query")[0]
        return self.store.search(vector, k, filters, distinct_documents)

    def retrieve_many(
        self,
        queries: list[str],
        k: int | None = None,
        filters: Mapping[str, Any] | None = None,
        distinct_documents: bool = False,
    ) -> list[list[dict[str, Any]]]:
        """``retrieve`` for many queries, embedded in one batch."""
        queries = [check_query(q, self.max_query_chars) for q in queries]
        k = check_k(k, self.default_k, self.max_k)
        vectors = self.embedder.embed(queries, kind="query")
        return [self.store.search(v, k, filters, distinct_documents) for v in vectors]

    def close(self) -> None:
        """Release the store (a local folder becomes free for the next process)."""
        self.store.close()


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
class Retriever:
    """Ray Serve deployment: retrieval and embeddings over one Qdrant collection.

    Bind with ``Retriever.bind(model, qdrant, default_k)``; ``model=None`` uses the model the
    collection records. Keep ``num_replicas: 1`` for a local-mode folder.
    """

    def __init__(
        self,
        model: str | None = None,
        qdrant: dict[str, Any] | None = None,
        default_k: int = 5,
        max_k: int = 50,
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.01,
        device: str = "auto",
    ) -> None:
        import torch

        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        self.core = RetrieverCore(
            qdrant or {}, model, default_k=default_k, max_k=max_k, device=device
        )
        self._embed_batched.set_max_batch_size(max_batch_size)
        self._embed_batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _embed_batched(self, items: list[tuple[str, str]]) -> list[list[float]]:
        """Concurrent callers' texts embedded together; each item is ``(text, kind)``."""
        out: list[list[float] | None] = [None] * len(items)
        for kind in ("query", "document"):
            idx = [i for i, (_, k) in enumerate(items) if k == kind]
            if idx:
                vectors = await asyncio.to_thread(self.core.embed, [items[i][0] for i in idx], kind)
                for i, v in zip(idx, vectors, strict=True):
                    out[i] = v
        return out  # type: ignore[return-value]

    async def retrieve(
        self, query: str, k: int | None = None, filters: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Top-k passages (``ValueError`` naming the field for a bad query, k or filter)."""
        query = check_query(query, self.core.max_query_chars)
        k = check_k(k, self.core.default_k, self.core.max_k)
        vector = await self._embed_batched((query, "query"))
        # A server search is a blocking HTTP call; keep it off the replica's event loop.
        return await asyncio.to_thread(self.core.search_vector, vector, k, filters)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Normalised document embeddings of ``texts``, in order."""
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts: must be a list of strings")
        return list(await asyncio.gather(*(self._embed_batched((t, "document")) for t in texts)))

    def ready(self) -> bool:
        """The replica exists only once the embedder and the collection are open."""
        return True

    def info(self) -> dict[str, Any]:
        """Model, dimension and collection (for a models listing)."""
        return {
            "model": self.core.embedder.model_name,
            "dimension": self.core.embedder.dimension,
            "collection": self.core.store.collection,
            "points": self.core.store.count(),
        }

    def check_health(self) -> None:
        """Serve's periodic probe: the collection must still answer."""
        if not self.core.store.exists():
            raise RuntimeError(f"{self.core.store.options.describe()} is gone")
