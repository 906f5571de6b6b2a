"""Python clients for a taskray Serve endpoint: ``Client`` (sync) and ``AsyncClient``.

>>> from serve.client import Client
>>> client = Client("http://127.0.0.1:8000")
>>> client.classify("The battery died after two days.").label
'Negative'
>>> client.summarize("A long document ...")["text"]
>>> for piece in client.chat([{"role": "user", "content": "Hi"}], model="my-lm", stream=True):
...     print(piece, end="")

One method per task route (``/v1/tasks/{task}``), ``complete``/``chat`` for the
OpenAI-compatible routes (``stream=True`` gives an iterator of text pieces), and ``models``.
Retries (with exponential backoff) apply to connection errors and 503 only: anything else is
the server's considered answer and raises ``TaskrayError`` with its status and message.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, overload

import httpx

from serve.async_client import AsyncClient
from serve.client_base import (
    IMAGE_MAGIC,
    Generated,
    TaskrayError,
    Usage,
    _error,
    _generated,
    _generation_body,
    _Routes,
    _sse_piece,
    _task_body,
    _vlm_body,
    _vlm_form,
    image_data_uri,
    image_payload,
)
from serve.schemas import ClassifyResponse, ClassLabel, ModelList, TaskResponse

__all__ = [
    "IMAGE_MAGIC",
    "AsyncClient",
    "Client",
    "Generated",
    "TaskrayError",
    "Usage",
    "image_data_uri",
    "image_payload",
]


class Client(_Routes):
    """Synchronous client; ``retries`` applies to connection errors and 503 only."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)
        self.retries = retries
        self.backoff_s = backoff_s
        self.retried = 0  # retries made so far (reliability scripts count them)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _send(self, method: str, path: str, json_body: Any = None, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, json=json_body, **kwargs)
            except httpx.TransportError:
                if attempt >= self.retries:
                    raise
            else:
                if response.status_code != 503 or attempt >= self.retries:
                    return response
            time.sleep(self.backoff_s * (2**attempt))
            attempt += 1
            self.retried += 1

    def _request(self, method: str, path: str, json_body: Any = None, **kwargs: Any) -> Any:
        response = self._send(method, path, json_body, **kwargs)
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def vlm(
        self,
        image: bytes | str | Path,
        prompt: str,
        *,
        model: str | None = None,
        upload: bool = False,
        **params: Any,
    ) -> dict[str, Any]:
        """``/v1/tasks/multimodal``: a question about an image (bytes or a file path) →
        ``{"text"}``. ``upload=True`` sends a multipart upload instead of base64 JSON
        (generation settings go with JSON only)."""
        if upload:
            files = {"image": ("image", image_payload(image), "application/octet-stream")}
            data = self._request(
                "POST", "/v1/tasks/multimodal", files=files, data=_vlm_form(prompt, model)
            )
        else:
            data = self._request(
                "POST", "/v1/tasks/multimodal", _vlm_body(image, prompt, model, params)
            )
        return TaskResponse.model_validate(data).predictions[0]

    def health(self) -> bool:
        """True when the server process answers."""
        return self._http.get("/healthz").status_code == 200

    def ready(self) -> bool:
        """True when every model is loaded."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float = 120.0, interval_s: float = 0.5) -> None:
        """Poll ``/readyz`` until it answers 200, or raise ``TimeoutError``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(interval_s)
        raise TimeoutError(f"server not ready after {timeout_s:.0f}s")

    def models(self) -> ModelList:
        """The served models and adapters."""
        return ModelList.model_validate(self._request("GET", "/v1/models"))

    @overload
    def classify(
        self, text: str, *, model: str | None = ..., return_all_scores: bool = ...
    ) -> ClassLabel: ...

    @overload
    def classify(
        self, text: list[str], *, model: str | None = ..., return_all_scores: bool = ...
    ) -> list[ClassLabel]: ...

    def classify(
        self,
        text: str | list[str],
        *,
        model: str | None = None,
        return_all_scores: bool = False,
    ) -> ClassLabel | list[ClassLabel]:
        """Classify one text (→ one result) or a list (→ a list in the same order)."""
        body: dict[str, Any] = {"return_all_scores": return_all_scores}
        body["text" if isinstance(text, str) else "texts"] = (
            text if isinstance(text, str) else list(text)
        )
        if model is not None:
            body["model"] = model
        result = ClassifyResponse.model_validate(
            self._request("POST", "/v1/tasks/classification", body)
        )
        return result.predictions[0] if isinstance(text, str) else result.predictions

    def task(
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
        result = TaskResponse.model_validate(self._request("POST", f"/v1/tasks/{task}", body))
        return result.predictions[0] if input is not None else result.predictions

    def complete(
        self, prompt: str, *, model: str, stream: bool = False, **params: Any
    ) -> Generated | Iterator[str]:
        """``/v1/completions``: a ``Generated``, or with ``stream=True`` its text pieces."""
        body = _generation_body(model, stream, {"prompt": prompt, **params})
        if stream:
            return self._stream("/v1/completions", body, chat=False)
        return _generated(self._request("POST", "/v1/completions", body), chat=False)

    def chat(
        self, messages: list[dict[str, Any]], *, model: str, stream: bool = False, **params: Any
    ) -> Generated | Iterator[str]:
        """``/v1/chat/completions``: a ``Generated``, or with ``stream=True`` text pieces."""
        body = _generation_body(model, stream, {"messages": messages, **params})
        if stream:
            return self._stream("/v1/chat/completions", body, chat=True)
        return _generated(self._request("POST", "/v1/chat/completions", body), chat=True)

    def retrieve(
        self, query: str, *, k: int | None = None, filters: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """``/v1/retrieve``: passages best first (id, doc_id, title, text, start, end, score)."""
        body = {"query": query, "k": k, "filters": filters}
        data = self._request("POST", "/v1/retrieve", {k_: v for k_, v in body.items() if v})
        return data["passages"]

    def embed(self, texts: list[str]) -> list[list[float]]:
        """``/v1/embeddings``: one normalised vector per text, in order."""
        data = self._request("POST", "/v1/embeddings", {"input": list(texts)})
        return [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]

    def rag(
        self,
        question: str,
        *,
        k: int | None = None,
        filters: dict[str, Any] | None = None,
        mode: str = "generate",
        image: bytes | str | Path | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """``/v1/rag``: the answer, its cited passages and per-stage timings; with ``image``
        the server's vision-language model answers about it from the passages."""
        body: dict[str, Any] = {"question": question, "mode": mode}
        if image is not None:
            body["image"] = image_data_uri(image)
        if k is not None:
            body["k"] = k
        if filters:
            body["filters"] = filters
        if params:
            body["parameters"] = params
        return self._request("POST", "/v1/rag", body)

    def _stream(self, path: str, body: dict[str, Any], chat: bool) -> Iterator[str]:
        with self._http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            for line in response.iter_lines():
                piece = _sse_piece(line, chat)
                if piece:
                    yield piece
