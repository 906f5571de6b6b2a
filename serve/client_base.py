"""What both taskray clients share: the error type, the result models, request bodies, server-sent
event parsing, image payloads and the task-route conveniences (``serve/client.py`` holds
``Client``, ``serve/async_client.py`` ``AsyncClient``; import both from ``serve.client``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel


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
