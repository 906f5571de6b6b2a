"""Multimodal routes: ``/v1/tasks/multimodal`` (JSON base64 or a multipart upload) and chat with
an ``image_url`` part for a vision-language model; every image is checked here (format, bytes,
pixels) before the model's replica sees it."""

import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from serve.config import Limits
from serve.guard import _first_line, _validation_line
from serve.ingress import IngressCore, is_vlm
from serve.routes.openai import response_body
from serve.schemas import (
    ChatMessage,
    ChatRequest,
    GenerationParameters,
    MultimodalRequest,
    TaskResponse,
)


def multimodal_routes(api: FastAPI) -> type[IngressCore]:
    """The route mixin, its routes registered on ``api`` (the ingress's FastAPI app)."""

    class MultimodalRoutes(IngressCore):
        """``/v1/tasks/multimodal``; chat with an image (reached from the chat route)."""

        @api.post(
            "/v1/tasks/multimodal",
            response_model=TaskResponse,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/MultimodalRequest"}
                        },
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["image", "prompt"],
                                "properties": {
                                    "image": {"type": "string", "format": "binary"},
                                    "prompt": {"type": "string"},
                                    "model": {"type": "string"},
                                },
                            }
                        },
                    },
                }
            },
        )
        async def multimodal(self, request: Request) -> TaskResponse:
            """An image and a question about it → ``{"text"}``. JSON with ``image`` as base64
            (or a data URI), or a multipart upload with the file in the ``image`` field."""
            self._auth(request)
            data, body = await self._multimodal_body(request)
            name = self._pick("multimodal", body.model)
            meta = self.metas[self.adapters.get(name, name)]
            if not is_vlm(meta):
                raise HTTPException(422, f"model '{name}' is not multimodal")
            self._text_limit(body.prompt, "prompt")
            params = self._params(name, (body.parameters or GenerationParameters()).model_dump())
            done = await self._vlm_answer(name, data, body.prompt, params)
            return TaskResponse(model=name, task="multimodal", predictions=[{"text": done["text"]}])

        async def _multimodal_body(self, request: Request) -> tuple[bytes, MultimodalRequest]:
            from pydantic import ValidationError

            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await request.form(max_files=1, max_fields=8)
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    raise HTTPException(422, "image: attach the image file as form field 'image'")
                data = check_image(await upload.read(), self.limits)
                fields = {k: v for k, v in form.items() if k in ("prompt", "model")}
                try:
                    body = MultimodalRequest.model_validate({**fields, "image": "upload"})
                except ValidationError as err:
                    raise HTTPException(422, _validation_line(err)) from None
                return data, body
            try:
                body = MultimodalRequest.model_validate_json(await request.body())
            except ValidationError as err:
                raise HTTPException(422, _validation_line(err)) from None
            return image_bytes(body.image, self.limits), body

        async def _vlm_answer(
            self, name: str, data: bytes, prompt: str, params: dict[str, Any]
        ) -> dict[str, Any]:
            try:
                return await self.handles[name].answer.remote(data, prompt, params)
            except ValueError as err:  # the replica's own image check
                raise HTTPException(422, _first_line(err)) from None

        async def _vlm_chat(self, body: ChatRequest) -> Any:
            images, prompt = _vlm_messages(body.messages)
            if len(images) != 1:
                raise HTTPException(
                    422,
                    f"messages: model '{body.model}' needs exactly one image_url part, "
                    f"got {len(images)}",
                )
            where, url = images[0]
            data = image_bytes(url, self.limits, where)
            if not prompt.strip():
                raise HTTPException(422, "messages: the last user message has no text")
            self._text_limit(prompt, "messages")
            params = self._openai_params(body.model, body)
            done = await self._vlm_answer(body.model, data, prompt, params)
            rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            head = {"id": rid, "created": int(time.time()), "model": body.model}
            finish = "length" if done["completion_tokens"] >= params["max_new_tokens"] else "stop"
            if body.stream:
                # The answer is generated in one batched call; it is sent as one delta.
                def sse(delta: dict[str, Any], reason: str | None) -> str:
                    choice = {"index": 0, "delta": delta, "finish_reason": reason}
                    event = {**head, "object": "chat.completion.chunk", "choices": [choice]}
                    return f"data: {json.dumps(event)}\n\n"

                async def events() -> Any:
                    yield sse({"role": "assistant"}, None)
                    yield sse({"content": done["text"]}, None)
                    yield sse({}, finish)
                    yield "data: [DONE]\n\n"

                return StreamingResponse(events(), media_type="text/event-stream")
            return response_body(rid, body.model, done, finish, chat=True)

    return MultimodalRoutes


def image_bytes(value: str, limits: Limits, where: str = "image") -> bytes:
    """The checked bytes of a request's image (a data URI or plain base64): decodable, in a
    supported format, within the size and pixel limits — else a 4xx naming the problem."""
    import base64
    import binascii

    from tasks.multimodal import decode_image_field

    if value.startswith(("http://", "https://", "file:", "/")):
        raise HTTPException(
            422,
            f"{where}: give the image inline (data:image/...;base64,...); URLs and paths "
            "are not fetched",
        )
    try:
        data = decode_image_field(value)
        if data is None:
            data = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise HTTPException(422, f"{where}: not valid base64 (or a data:image/ URI)") from None
    return check_image(data, limits, where)


def check_image(data: bytes, limits: Limits, where: str = "image") -> bytes:
    """``data`` if it is an acceptable image; 413 over a limit, 422 when it is not one."""
    from tasks import RowError
    from tasks.multimodal import load_image

    try:
        load_image(data, limits.max_image_bytes, limits.max_image_pixels, what=where)
    except RowError as err:
        status = 413 if "over the limit" in err.reason else 422
        raise HTTPException(status, str(err)) from None
    return data


def _vlm_messages(messages: list[ChatMessage]) -> tuple[list[tuple[str, str]], str]:
    """The ``image_url`` parts (where, url) of a chat and the last user message's text."""
    images: list[tuple[str, str]] = []
    text = ""
    for i, message in enumerate(messages):
        parts = message.content
        if parts is None:
            continue
        if isinstance(parts, str):
            if message.role == "user":
                text = parts
            continue
        for j, part in enumerate(parts):
            if part.type == "image_url":
                url = (part.image_url or {}).get("url")
                if not isinstance(url, str) or not url:
                    raise HTTPException(
                        422, f"messages.{i}.content.{j}.image_url.url: give a data: URI"
                    )
                images.append((f"messages.{i}.content.{j}.image_url.url", url))
        if message.role == "user":
            text = "".join(p.text or "" for p in parts if p.type == "text")
    return images, text
