"""Chunks in Qdrant: one collection per index, deterministic point ids, payload filters.

Local mode (``QdrantClient(path=...)``, the default) keeps the collection in a folder that one
process at a time may open: qdrant-client takes an exclusive lock on it. So the hand-over is
explicit: the indexing job ``close()``s the store before the retriever deployment (one replica)
opens it, and re-indexing a folder that a running retriever holds fails with a message saying so.
Anything shared or concurrent uses a Qdrant server (``url``, API key from an environment
variable).

The embedding model and dimension are stored in the collection's metadata (a Qdrant feature
since 1.16, also kept by local mode), so opening an index with a different model is an error
instead of silently meaningless scores.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from actors.config import Strict
from tasks.chunking import passage_id

log = logging.getLogger("taskray")

POINT_NAMESPACE = uuid.UUID("5c8f4b1e-2d0a-5b57-9f0e-7a4c1d3e9b21")
"""Namespace of the uuid5 point ids; fixed forever, or re-indexing would duplicate every chunk."""

METADATA_KEY = "taskray"
PAYLOAD_FIELDS = ("doc_id", "chunk_index", "title", "url", "text", "start", "end")
"""Top-level payload keys; any other filter key is looked up under ``metadata.``."""
DEFAULT_PATH = "runs/qdrant"


class StoreError(ValueError):
    """The vector store cannot be used as asked; the message says why and what to do."""


class FilterError(StoreError):
    """A search filter that cannot be translated (names the key and the accepted forms)."""


class QdrantOptions(Strict):
    """Where the index lives: a local folder (default) or a Qdrant server."""

    collection: str = Field(default="taskray", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
    path: str | None = Field(
        default=None,
        description=f"local-mode folder (default {DEFAULT_PATH} unless url or QDRANT_URL is set)",
    )
    url: str | None = Field(default=None, description="Qdrant server URL; QDRANT_URL also")
    api_key_env: str = Field(
        default="QDRANT_API_KEY", description="environment variable that holds the API key"
    )
    timeout_s: int = Field(default=60, ge=1)
    batch_size: int = Field(default=256, ge=1, description="points per upsert request")

    def location(self) -> tuple[str, str]:
        """``("url", URL)`` or ``("path", absolute folder)``: explicit url, explicit path,
        then ``QDRANT_URL``, then the default folder."""
        if self.url:
            return "url", self.url
        if self.path:
            return "path", str(Path(self.path).expanduser().resolve())
        env_url = os.environ.get("QDRANT_URL")
        if env_url:
            return "url", env_url
        return "path", str(Path(DEFAULT_PATH).resolve())

    def describe(self) -> str:
        """Where, in words (for messages)."""
        kind, where = self.location()
        return f"collection '{self.collection}' at {where}" + (
            " (local mode)" if kind == "path" else ""
        )


def point_id(doc_id: str, chunk_index: int) -> str:
    """The chunk's point id: the same document and index always give the same id, so
    re-indexing overwrites instead of duplicating."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{doc_id}:{chunk_index}"))


def to_filter(filters: Mapping[str, Any] | None) -> Any:
    """Equality filters → a Qdrant ``Filter`` (all conditions must hold).

    ``{"doc_id": "a"}`` matches a payload field; any other key is a document metadata field
    (``{"lang": "en"}`` ≡ ``{"metadata.lang": "en"}``). A list matches any of its values and
    ``{"gte": .., "lt": ..}`` is a numeric range.
    """
    from qdrant_client import models

    if not filters:
        return None
    if not isinstance(filters, Mapping):
        raise FilterError("filters must be an object of field: value pairs")
    must = []
    for key, value in filters.items():
        if not isinstance(key, str) or not key:
            raise FilterError(f"filter key {key!r} must be a non-empty string")
        field = key if key in PAYLOAD_FIELDS or key.startswith("metadata.") else f"metadata.{key}"
        if isinstance(value, str | int):  # bool is an int
            must.append(models.FieldCondition(key=field, match=models.MatchValue(value=value)))
        elif _uniform_list(value):
            must.append(models.FieldCondition(key=field, match=models.MatchAny(any=value)))
        elif (
            isinstance(value, Mapping)
            and value
            and set(value) <= {"gt", "gte", "lt", "lte"}
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values())
        ):
            must.append(models.FieldCondition(key=field, range=models.Range(**value)))
        else:
            raise FilterError(
                f"filter '{key}': use a string, integer or boolean, a non-empty list of strings "
                'or of integers, or a range like {"gte": 1, "lt": 5}'
            )
    return models.Filter(must=must)


def _uniform_list(value: Any) -> bool:
    """A non-empty list of only strings or only (non-bool) integers: what ``MatchAny`` takes."""
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(v, str) for v in value):
        return True
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def hit_to_passage(point: Any) -> dict[str, Any]:
    """A Qdrant hit → a passage dict usable as a ``tasks.rag.Passage`` (``id`` is the citation
    id ``doc#chunk``) with the payload fields, the score and the point id."""
    payload = dict(point.payload or {})
    doc_id = str(payload.get("doc_id", ""))
    chunk_index = int(payload.get("chunk_index", 0))
    return {
        "id": passage_id(doc_id, chunk_index),
        "score": float(point.score) if getattr(point, "score", None) is not None else None,
        "point_id": str(point.id),
        "doc_id": doc_id,
        "chunk_index": chunk_index,
        "title": payload.get("title"),
        "url": payload.get("url"),
        "text": payload.get("text", ""),
        "start": payload.get("start"),
        "end": payload.get("end"),
        "metadata": payload.get("metadata") or {},
    }


class VectorStore:
    """One Qdrant collection of chunks. ``close()`` it (or use ``with``) to release a local
    folder for the next process."""

    def __init__(self, options: QdrantOptions, client: Any) -> None:
        self.options = options
        self.collection = options.collection
        self.client = client
        self._vector_size: int | None = None  # cached for the per-query dimension check

    @classmethod
    def open(cls, options: QdrantOptions) -> VectorStore:
        """Connect (server) or open the folder (local mode); a held folder is a clear error."""
        from qdrant_client import QdrantClient

        kind, where = options.location()
        if kind == "url":
            api_key = os.environ.get(options.api_key_env) or None
            client = QdrantClient(url=where, api_key=api_key, timeout=options.timeout_s)
            return cls(options, client)
        try:
            client = QdrantClient(path=where)
        except RuntimeError as err:
            if "already accessed" not in str(err):
                raise
            raise StoreError(
                f"the Qdrant folder {where} is open in another process (a retriever deployment "
                "or another indexing job); stop it first, or use a Qdrant server (--qdrant-url) "
                "for concurrent access"
            ) from None
        return cls(options, client)

    def close(self) -> None:
        """Release the client (and, in local mode, the folder lock)."""
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # ----- the collection and its recorded model --------------------------------------------
    def exists(self) -> bool:
        """Whether the collection exists."""
        return bool(self.client.collection_exists(self.collection))

    def recorded_model(self) -> dict[str, Any] | None:
        """``{"embedding_model", "dimension", ...}`` stored when the collection was created, or
        None (no collection, or one made by something else)."""
        if not self.exists():
            return None
        meta = self.client.get_collection(self.collection).config.metadata or {}
        recorded = meta.get(METADATA_KEY)
        return dict(recorded) if isinstance(recorded, Mapping) else None

    def check_model(self, model_name: str, dimension: int | None = None) -> None:
        """Raise ``StoreError`` when the existing collection was built with another model or
        holds vectors of another size (a no-op when the collection does not exist yet)."""
        if not self.exists():
            return
        info = self.client.get_collection(self.collection)
        vectors = info.config.params.vectors
        where = self.options.describe()
        if not hasattr(vectors, "size"):
            raise StoreError(
                f"{where} uses named vectors; taskray indexes need a single unnamed vector "
                "(index into a new collection with --collection NAME)"
            )
        recorded = self.recorded_model() or {}
        stored_model = recorded.get("embedding_model")
        if dimension is not None and int(vectors.size) != dimension:
            raise StoreError(
                f"{where} holds {vectors.size}-dimensional vectors but the embedder "
                f"'{model_name}' makes {dimension}-dimensional ones; use the model it was built "
                f"with ({stored_model or 'unknown'}) or index into a new collection"
            )
        if str(vectors.distance).lower().split(".")[-1] != "cosine":
            raise StoreError(f"{where} uses {vectors.distance} distance; taskray needs cosine")
        if stored_model is None:
            log.warning("%s records no embedding model; only its dimension was checked", where)
        elif stored_model != model_name:
            raise StoreError(
                f"{where} was built with embedding model '{stored_model}', not '{model_name}'; "
                f"use --model {stored_model} or index into a new collection (--collection NAME)"
            )

    def ensure_collection(
        self, dimension: int, model_name: str, extra: Mapping[str, Any] | None = None
    ) -> bool:
        """Create the collection (cosine, ``dimension``, model recorded) or check the existing
        one; returns True when it was created."""
        from qdrant_client import models

        if self.exists():
            self.check_model(model_name, dimension)
            return False
        record = {"embedding_model": model_name, "dimension": dimension, "distance": "cosine"}
        record.update(extra or {})
        self._vector_size = None
        self.client.create_collection(
            self.collection,
            vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
            metadata={METADATA_KEY: record},
        )
        if self.options.location()[0] == "url":
            # A server filters and deletes by doc_id through this index; local mode scans
            # (and only warns about indexes), so it is made for servers only.
            self.client.create_payload_index(
                self.collection, "doc_id", field_schema=models.PayloadSchemaType.KEYWORD
            )
            self.client.create_payload_index(
                self.collection, "chunk_index", field_schema=models.PayloadSchemaType.INTEGER
            )
        return True

    def count(self) -> int:
        """Points in the collection (0 when it does not exist)."""
        if not self.exists():
            return 0
        return int(self.client.count(self.collection, exact=True).count)

    # ----- writing -------------------------------------------------------------------------
    def upsert_chunks(self, chunks: Sequence[Mapping[str, Any]], vectors: np.ndarray) -> int:
        """Upsert chunks (dicts from ``tasks.chunking.chunk_document``) with their vectors, in
        requests of ``options.batch_size`` points; returns how many were written."""
        from qdrant_client import models

        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        points = [
            models.PointStruct(
                id=point_id(c["doc_id"], int(c["chunk_index"])),
                vector=np.asarray(v, dtype=np.float32).tolist(),
                payload={
                    "doc_id": c["doc_id"],
                    "chunk_index": int(c["chunk_index"]),
                    "title": c.get("title"),
                    "url": c.get("url"),
                    "text": c["text"],
                    "start": int(c["start"]),
                    "end": int(c["end"]),
                    "metadata": dict(c.get("metadata") or {}),
                },
            )
            for c, v in zip(chunks, vectors, strict=True)
        ]
        step = self.options.batch_size
        for i in range(0, len(points), step):
            self.client.upsert(self.collection, points=points[i : i + step], wait=True)
        return len(points)

    def delete_stale_chunks(self, chunk_counts: Mapping[str, int]) -> None:
        """Delete chunks of each document whose index is at or past its new chunk count.

        The indexer upserts a document's new chunks first and deletes the surplus after, so a
        re-indexed document is never missing from search (delete-then-upsert would leave a gap
        that a server's concurrent readers could see). Idempotent, so repeating it per batch is
        harmless.
        """
        from qdrant_client import models

        if not chunk_counts:
            return
        per_doc = [
            models.Filter(
                must=[
                    models.FieldCondition(key="doc_id", match=models.MatchValue(value=doc)),
                    models.FieldCondition(key="chunk_index", range=models.Range(gte=int(n))),
                ]
            )
            for doc, n in chunk_counts.items()
        ]
        for i in range(0, len(per_doc), 64):
            self.client.delete(
                self.collection,
                points_selector=models.FilterSelector(
                    filter=models.Filter(should=per_doc[i : i + 64])
                ),
                wait=True,
            )

    def delete_documents(self, doc_ids: Iterable[str]) -> None:
        """Delete every chunk of these documents."""
        from qdrant_client import models

        ids = sorted(set(doc_ids))
        for i in range(0, len(ids), 256):
            self.client.delete(
                self.collection,
                points_selector=models.FilterSelector(
                    filter=models.Filter(
                        must=[
                            models.FieldCondition(
                                key="doc_id", match=models.MatchAny(any=ids[i : i + 256])
                            )
                        ]
                    )
                ),
                wait=True,
            )

    def prune_documents(self, keep: Iterable[str]) -> set[str]:
        """Delete every document whose id is not in ``keep`` (the current input); returns the
        ids deleted. What ``prune: true`` does after an indexing run."""
        stale = self.doc_ids() - set(keep)
        if stale:
            self.delete_documents(stale)
        return stale

    def doc_ids(self) -> set[str]:
        """Every document id in the collection (scrolls payloads; for pruning)."""
        from qdrant_client import models

        found: set[str] = set()
        offset = None
        while True:
            points, offset = self.client.scroll(
                self.collection,
                limit=1024,
                offset=offset,
                with_payload=models.PayloadSelectorInclude(include=["doc_id"]),
                with_vectors=False,
            )
            found.update(str(p.payload.get("doc_id")) for p in points if p.payload)
            if offset is None:
                return found

    # ----- reading -------------------------------------------------------------------------
    def _check_query_size(self, size: int) -> None:
        """Raise ``StoreError`` naming both sizes when a query vector does not fit the
        collection (local mode would fail deep in numpy, a server with a terse 400)."""
        for refresh in (False, True):
            if refresh or self._vector_size is None:
                vectors = self.client.get_collection(self.collection).config.params.vectors
                self._vector_size = int(getattr(vectors, "size", 0) or 0) or None
            # Checked twice so a collection re-created since the cache was filled is no error.
            if self._vector_size is None or self._vector_size == size:
                return
        recorded = (self.recorded_model() or {}).get("embedding_model", "unknown")
        raise StoreError(
            f"{self.options.describe()} holds {self._vector_size}-dimensional vectors but the "
            f"query vector has {size}; embed queries with the model the collection was built "
            f"with ({recorded})"
        )

    def search(
        self,
        vector: Sequence[float] | np.ndarray,
        k: int = 5,
        filters: Mapping[str, Any] | None = None,
        distinct_documents: bool = False,
    ) -> list[dict[str, Any]]:
        """The ``k`` best chunks for a query vector (passage dicts, best first). With
        ``distinct_documents`` the best chunk of each of the ``k`` best documents (Qdrant's
        grouping by ``doc_id``)."""
        query = np.asarray(vector, dtype=np.float32).tolist()
        flt = to_filter(filters)
        if not self.exists():
            raise StoreError(
                f"{self.options.describe()} does not exist; build it with `taskray index`"
            )
        self._check_query_size(len(query))
        if distinct_documents:
            groups = self.client.query_points_groups(
                self.collection,
                query=query,
                group_by="doc_id",
                limit=k,
                group_size=1,
                query_filter=flt,
                with_payload=True,
            ).groups
            return [hit_to_passage(g.hits[0]) for g in groups if g.hits]
        hits = self.client.query_points(
            self.collection, query=query, limit=k, query_filter=flt, with_payload=True
        ).points
        return [hit_to_passage(h) for h in hits]
