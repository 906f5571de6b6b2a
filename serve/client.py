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

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, overload

import httpx
from pydantic import BaseModel

from serve.schemas import ClassifyResponse, ClassLabel, ModelList, TaskResponse


class TaskrayError(RuntimeError):
    """The server answered with an error; ``status`` is the HTTP code."""

    def __init__(self, status: int, message: str, kind: str = "error") -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.kind = kind


class Usage(BaseModel):
    """Token counts of one generation."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Generated(BaseModel):
    """A completion or a chat answer."""

    text: str
    finish_reason: str
    model: str
    usage: Usage


def _error(response: httpx.Response) -> TaskrayError:
    try:
        err = response.json().get("error", {})
        message, kind = err.get("message", response.text), err.get("type", "error")
        return TaskrayError(response.status_code, message, kind)
    except (ValueError, AttributeError):
        return TaskrayError(response.status_code, response.text or response.reason_phrase)


def _task_body(
    input: dict[str, Any] | None,
    inputs: list[dict[str, Any]] | None,
    model: str | None,
    parameters: dict[str, Any] | None,
    return_all_scores: bool = False,
) -> dict[str, Any]:
    if (input is None) == (inputs is None):
        raise ValueError("give exactly one of input= or inputs=")
    body: dict[str, Any] = {"input": input} if input is not None else {"inputs": inputs}
    if model is not None:
        body["model"] = model
    if parameters:
        body["parameters"] = parameters
    if return_all_scores:
        body["return_all_scores"] = True
    return body


def _generation_body(model: str, stream: bool, params: dict[str, Any]) -> dict[str, Any]:
    body = {"model": model, "stream": stream}
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def _generated(data: dict[str, Any], chat: bool) -> Generated:
    choice = data["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    return Generated(
        text=text, finish_reason=choice["finish_reason"], model=data["model"], usage=data["usage"]
    )


def _sse_piece(line: str, chat: bool) -> str | None:
    """The text of one server-sent event line (``None`` for non-text events)."""
    if not line.startswith("data: "):
        return None
    payload = line[6:]
    if payload == "[DONE]":
        return None
    event = json.loads(payload)
    if "error" in event:
        raise TaskrayError(500, event["error"].get("message", "stream failed"))
    choice = event["choices"][0]
    return (choice.get("delta", {}).get("content") if chat else choice.get("text")) or None


IMAGE_MAGIC = {
    b"\x89PNG": "png",
    b"\xff\xd8\xff": "jpeg",
    b"GIF8": "gif",
    b"RIFF": "webp",
    b"BM": "bmp",
}


def image_payload(image: bytes | str | Path) -> bytes:
    """The bytes of an image given as bytes or a file path."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    return Path(image).expanduser().read_bytes()


def image_data_uri(image: bytes | str | Path) -> str:
    """``data:image/<type>;base64,...`` of an image (bytes or a file path)."""
    import base64

    data = image_payload(image)
    kind = next((k for magic, k in IMAGE_MAGIC.items() if data.startswith(magic)), "png")
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _vlm_body(
    image: bytes | str | Path, prompt: str, model: str | None, params: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"image": image_data_uri(image), "prompt": prompt}
    if model is not None:
        body["model"] = model
    if params:
        body["parameters"] = params
    return body


def _vlm_form(prompt: str, model: str | None) -> dict[str, str]:
    return {"prompt": prompt, **({"model": model} if model is not None else {})}


class _Routes:
    """Task-route conveniences shared by both clients (each returns one prediction dict)."""

    def task(self, *args: Any, **kwargs: Any) -> Any:  # implemented by the clients
        raise NotImplementedError

    def _one(self, family: str, row: dict[str, Any], model: str | None, **params: Any) -> Any:
        return self.task(family, input=row, model=model, parameters=params or None)

    def generate(self, prompt: str, *, model: str | None = None, **params: Any) -> Any:
        """``generation``: ``{"text": …}``."""
        return self._one("generation", {"prompt": prompt}, model, **params)

    def dialogue(self, messages: list[dict[str, str]], *, model: str | None = None, **params: Any):
        """``dialogue``: the assistant's next message."""
        return self._one("dialogue", {"messages": messages}, model, **params)

    def nli(self, premise: str, hypothesis: str, *, model: str | None = None) -> Any:
        """``nli``: ``{"label": "entailment", "score": …}``."""
        return self._one("nli", {"premise": premise, "hypothesis": hypothesis}, model)

    def extractive_qa(self, question: str, context: str, *, model: str | None = None) -> Any:
        """``extractive_qa``: ``{"answer", "start", "end", "score"}`` (char offsets)."""
        return self._one("extractive_qa", {"question": question, "context": context}, model)

    def generative_qa(
        self, question: str, context: str | None = None, *, model: str | None = None, **params: Any
    ) -> Any:
        """``generative_qa``: ``{"text": …}``."""
        row = {"question": question, **({"context": context} if context is not None else {})}
        return self._one("generative_qa", row, model, **params)

    def ner(self, text: str, *, model: str | None = None) -> Any:
        """``ner``: entities by type with character spans."""
        return self._one("ner", {"text": text}, model)

    def summarize(self, document: str, *, model: str | None = None, **params: Any) -> Any:
        """``summarization``: ``{"text": …}``."""
        return self._one("summarization", {"document": document}, model, **params)

    def translate(
        self,
        source: str,
        source_lang: str,
        target_lang: str,
        *,
        model: str | None = None,
        **params: Any,
    ) -> Any:
        """``translation``: ``{"text": …}``."""
        row = {"source": source, "source_lang": source_lang, "target_lang": target_lang}
        return self._one("translation", row, model, **params)

    def code(self, prompt: str, *, model: str | None = None, **params: Any) -> Any:
        """``code``: ``{"code": …}``."""
        return self._one("code", {"prompt": prompt}, model, **params)

    def reason(self, question: str, *, model: str | None = None, **params: Any) -> Any:
        """``reasoning``: the steps and the extracted final answer."""
        return self._one("reasoning", {"question": question}, model, **params)


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
