"""``AsyncClient``: the asyncio twin of ``serve.client.Client`` (same methods, awaited)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from serve.client_base import (
    Generated,
    _error,
    _generated,
    _generation_body,
    _Routes,
    _sse_piece,
    _task_body,
    _vlm_body,
    _vlm_form,
    image_payload,
)
from serve.schemas import ClassifyResponse, ClassLabel, ModelList, TaskResponse


class AsyncClient(_Routes):
    """The asyncio twin of ``Client``: the same methods, awaited (streams are async
    iterators)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout, headers=headers
        )
        self.retries = retries
        self.backoff_s = backoff_s
        self.retried = 0

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, json_body: Any = None, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, json=json_body, **kwargs)
            except httpx.TransportError:
                if attempt >= self.retries:
                    raise
            else:
                if response.status_code != 503 or attempt >= self.retries:
                    break
            await asyncio.sleep(self.backoff_s * (2**attempt))
            attempt += 1
            self.retried += 1
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    async def ready(self) -> bool:
        """True when every model is loaded."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def models(self) -> ModelList:
        """The served models and adapters."""
        return ModelList.model_validate(await self._request("GET", "/v1/models"))

    async def classify(
        self, text: str | list[str], *, model: str | None = None, return_all_scores: bool = False
    ) -> ClassLabel | list[ClassLabel]:
        """Classify one text (→ one result) or a list (→ a list in the same order)."""
        body: dict[str, Any] = {"return_all_scores": return_all_scores}
        body["text" if isinstance(text, str) else "texts"] = (
            text if isinstance(text, str) else list(text)
        )
        if model is not None:
            body["model"] = model
        data = await self._request("POST", "/v1/tasks/classification", body)
        result = ClassifyResponse.model_validate(data)
        return result.predictions[0] if isinstance(text, str) else result.predictions

    async def task(
        self,
        task: str,
        input: dict[str, Any] | None = None,
        inputs: list[dict[str, Any]] | None = None,
        *,
        model: str | None = None,
        parameters: dict[str, Any] | None = None,
        return_all_scores: bool = False,
    ) -> Any:
        """Any task route: one row (→ its prediction dict) or several (→ a list)."""
        body = _task_body(input, inputs, model, parameters, return_all_scores)
        data = await self._request("POST", f"/v1/tasks/{task}", body)
        result = TaskResponse.model_validate(data)
        return result.predictions[0] if input is not None else result.predictions

    async def vlm(
        self,
        image: bytes | str | Path,
        prompt: str,
        *,
        model: str | None = None,
        upload: bool = False,
        **params: Any,
    ) -> dict[str, Any]:
        """``/v1/tasks/multimodal`` (see ``Client.vlm``)."""
        if upload:
            files = {"image": ("image", image_payload(image), "application/octet-stream")}
            data = await self._request(
                "POST", "/v1/tasks/multimodal", files=files, data=_vlm_form(prompt, model)
            )
        else:
            data = await self._request(
                "POST", "/v1/tasks/multimodal", _vlm_body(image, prompt, model, params)
            )
        return TaskResponse.model_validate(data).predictions[0]

    async def complete(self, prompt: str, *, model: str, **params: Any) -> Generated:
        """``/v1/completions`` (see ``stream_complete`` for streaming)."""
        body = _generation_body(model, False, {"prompt": prompt, **params})
        return _generated(await self._request("POST", "/v1/completions", body), chat=False)

    async def chat(self, messages: list[dict[str, Any]], *, model: str, **params: Any):
        """``/v1/chat/completions`` (see ``stream_chat`` for streaming)."""
        body = _generation_body(model, False, {"messages": messages, **params})
        return _generated(await self._request("POST", "/v1/chat/completions", body), chat=True)

    async def stream_complete(self, prompt: str, *, model: str, **params: Any):
        """Text pieces of a streamed completion."""
        body = _generation_body(model, True, {"prompt": prompt, **params})
        async for piece in self._stream("/v1/completions", body, chat=False):
            yield piece

    async def stream_chat(self, messages: list[dict[str, Any]], *, model: str, **params: Any):
        """Text pieces of a streamed chat answer."""
        body = _generation_body(model, True, {"messages": messages, **params})
        async for piece in self._stream("/v1/chat/completions", body, chat=True):
            yield piece

    async def _stream(self, path: str, body: dict[str, Any], chat: bool) -> AsyncIterator[str]:
        async with self._http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                raise _error(response)
            async for line in response.aiter_lines():
                piece = _sse_piece(line, chat)
                if piece:
                    yield piece
