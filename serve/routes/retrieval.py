"""Retrieval and RAG routes: ``/v1/retrieve``, OpenAI-compatible ``/v1/embeddings`` and ``/v1/rag``
(retrieve → cited prompt → generate or extractive read; streamed, or with an image)."""

import asyncio
import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentHandle

from serve.guard import _first_line
from serve.ingress import IngressCore
from serve.routes.multimodal import image_bytes
from serve.schemas import (
    EmbeddingsRequest,
    GenerationParameters,
    RagRequest,
    RetrieveRequest,
    RetrieveResponse,
)


def retrieval_routes(api: FastAPI) -> type[IngressCore]:
    """The route mixin, its routes registered on ``api`` (the ingress's FastAPI app)."""

    class RetrievalRoutes(IngressCore):
        """``/v1/retrieve``, ``/v1/embeddings`` and ``/v1/rag``."""

        # ----- retrieval and RAG ------------------------------------------------------------
        @api.post("/v1/retrieve", response_model=RetrieveResponse)
        async def retrieve(self, body: RetrieveRequest, request: Request) -> RetrieveResponse:
            """Top-k passages of the index with scores, document ids and character spans."""
            self._auth(request)
            retriever = self._need(self.retriever, "retrieval")
            self._text_limit(body.query, "query")
            try:
                passages = await retriever.retrieve.remote(body.query, body.k, body.filters)
            except ValueError as err:
                raise HTTPException(422, _first_line(err)) from None
            return RetrieveResponse(passages=passages)

        @api.post("/v1/embeddings")
        async def embeddings(self, body: EmbeddingsRequest, request: Request) -> Any:
            """OpenAI-compatible embeddings from the retriever's (normalised) embedder."""
            self._auth(request)
            retriever = self._need(self.retriever, "retrieval")
            texts = [body.input] if isinstance(body.input, str) else list(body.input)
            if not texts:
                raise HTTPException(422, "input: must hold at least one text")
            if len(texts) > self.limits.max_batch_texts:
                raise HTTPException(
                    413,
                    f"input: {len(texts)} items exceed limits.max_batch_texts="
                    f"{self.limits.max_batch_texts}",
                )
            for i, text in enumerate(texts):
                self._text_limit(text, "input" if isinstance(body.input, str) else f"input.{i}")
            vectors, info = await asyncio.gather(
                retriever.embed.remote(texts), retriever.info.remote()
            )
            words = sum(len(t.split()) for t in texts)
            return {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": _encode(v, body.encoding_format),
                    }
                    for i, v in enumerate(vectors)
                ],
                "model": info["model"],
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }

        @api.post("/v1/rag")
        async def rag_answer(self, body: RagRequest, request: Request) -> Any:
            """Retrieve → cited prompt → generate (or extractive read), with sources and
            per-stage timings; ``stream: true`` sends passages, text pieces, then the rest."""
            self._auth(request)
            rag = self._need(self.rag, "RAG")
            self._text_limit(body.question, "question")
            if body.image is not None:
                return await self._rag_image(rag, body)
            rag_args = self.args.retrieval.rag if self.args.retrieval else None
            generator = rag_args.generator if rag_args else None
            params = None
            if generator is not None:
                params = self._params(
                    generator, (body.parameters or GenerationParameters()).model_dump()
                )
            elif body.parameters is not None:
                raise HTTPException(422, "parameters: this RAG pipeline has no generator")
            if body.stream:
                if body.mode != "generate" or generator is None:
                    raise HTTPException(422, "stream: only the generate mode streams")
                stream = rag.options(stream=True).stream.remote(
                    body.question, body.k, body.filters, params
                )
                return StreamingResponse(_rag_events(stream), media_type="text/event-stream")
            try:
                return await rag.answer.remote(
                    body.question, body.k, body.filters, body.mode, params
                )
            except ValueError as err:
                raise HTTPException(422, _first_line(err)) from None

        async def _rag_image(self, rag: DeploymentHandle, body: RagRequest) -> Any:
            rag_args = self.args.retrieval.rag if self.args.retrieval else None
            vlm = rag_args.vlm if rag_args else None
            if vlm is None:
                raise HTTPException(
                    422, "image: this RAG pipeline has no vlm (set retrieval.rag.vlm)"
                )
            if body.stream or body.mode != "generate":
                raise HTTPException(
                    422, "image: answers with an image are not streamed and use the generate mode"
                )
            data = image_bytes(body.image or "", self.limits)
            params = self._params(vlm, (body.parameters or GenerationParameters()).model_dump())
            try:
                return await rag.answer_with_image.remote(
                    body.question, data, body.k, body.filters, params
                )
            except ValueError as err:
                raise HTTPException(422, _first_line(err)) from None

    return RetrievalRoutes


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    """OpenAI's embedding encodings: a float list, or base64 of little-endian float32 (what
    the official client asks for by default)."""
    if encoding == "float":
        return vector
    import base64

    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


async def _rag_events(stream: Any) -> Any:
    """Server-sent events of a streamed RAG answer, ending with ``[DONE]``."""
    try:
        async for item in stream:
            yield f"data: {json.dumps(item)}\n\n"
    except Exception as err:  # headers are sent: report in-band, then end
        error = {"error": {"message": _first_line(err), "type": "error"}}
        yield f"data: {json.dumps(error)}\n\n"
    yield "data: [DONE]\n\n"
