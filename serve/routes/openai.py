"""OpenAI-compatible generation: ``/v1/completions`` and ``/v1/chat/completions``, plain or
streamed as server-sent events (a refusal — full queue, bad request — is answered with its
status before any event is sent)."""

import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentHandle

from serve.ingress import IngressCore, is_vlm
from serve.schemas import ChatMessage, ChatRequest, CompletionRequest

log = logging.getLogger("ray.serve")
DONE = "data: [DONE]\n\n"


def openai_routes(api: FastAPI) -> type[IngressCore]:
    """The route mixin, its routes registered on ``api`` (the ingress's FastAPI app)."""

    class OpenAIRoutes(IngressCore):
        """``/v1/completions`` and ``/v1/chat/completions`` (text models; a chat with an image
        goes to the multimodal mixin's ``_vlm_chat``)."""

        @api.post("/v1/completions")
        async def completions(self, body: CompletionRequest, request: Request) -> Any:
            """OpenAI-compatible text completion (``stream: true`` for server-sent events)."""
            self._auth(request)
            base, handle, adapter = self._generator(body.model)
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise HTTPException(422, "prompt: give one prompt per request")
            prompt = prompts[0]
            self._check_prompt(base, prompt, "prompt")
            params = self._openai_params(base, body)
            return await self._answer(handle, adapter, prompt, params, body, chat=False)

        @api.post("/v1/chat/completions")
        async def chat_completions(self, body: ChatRequest, request: Request) -> Any:
            """OpenAI-compatible chat (the model's chat template; ``stream: true`` for SSE).
            A multimodal model takes one ``image_url`` part (a data URI) and answers the last
            user message's text about it."""
            self._auth(request)
            vlm = self.adapters.get(body.model, body.model)
            if vlm in self.metas and is_vlm(self.metas[vlm]):
                return await self._vlm_chat(body)
            base, handle, adapter = self._generator(body.model)
            if len(body.messages) > self.limits.max_messages:
                raise HTTPException(
                    413,
                    f"messages: {len(body.messages)} exceed limits.max_messages="
                    f"{self.limits.max_messages}",
                )
            tok = self.tokenizers[base]
            if not getattr(tok, "chat_template", None):
                raise HTTPException(
                    422, f"model '{body.model}' has no chat template; use /v1/completions"
                )
            prompt = chat_prompt(tok, body.messages, body.tools, body.model)
            self._check_prompt(base, prompt, "messages")
            params = self._openai_params(base, body)
            return await self._answer(handle, adapter, prompt, params, body, chat=True)

        async def _answer(
            self,
            handle: DeploymentHandle,
            adapter: str | None,
            prompt: str,
            params: dict[str, Any],
            body: CompletionRequest | ChatRequest,
            chat: bool,
        ) -> Any:
            """Generate for a checked prompt: server-sent events, or one response body."""
            if adapter:
                handle = handle.options(multiplexed_model_id=adapter)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            if body.stream:
                return await self._sse(handle, prompt, params, rid, body.model, chat=chat)
            done = await handle.complete.remote(prompt, params)
            return response_body(rid, body.model, done, done["finish_reason"], chat)

        async def _sse(
            self,
            handle: DeploymentHandle,
            prompt: str,
            params: dict[str, Any],
            rid: str,
            model: str,
            chat: bool,
        ) -> StreamingResponse:
            created = int(time.time())
            kind = "chat.completion.chunk" if chat else "text_completion"

            def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
                if chat:
                    delta: dict[str, Any] = {"role": "assistant"} if first else {}
                    if text:
                        delta["content"] = text
                    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": text or "", "finish_reason": finish}
                body = {"id": rid, "object": kind, "created": created, "model": model}
                return f"data: {json.dumps({**body, 'choices': [choice]})}\n\n"

            stream = handle.options(stream=True).stream.remote(prompt, params)
            # The generator's first item comes with the first text: a full queue (503) or a
            # bad request raises here, answered with its status before any event is sent.
            first = await stream.__anext__()

            async def events() -> Any:
                # Each yield here is one message to the proxy: the role chunk goes with the
                # first text, the finish chunk and [DONE] with the last.
                finished = False
                head = chunk(None, None, first=True) if chat else ""
                try:
                    async for item in _chain([first], stream):
                        out = head + (chunk(item["text"], None) if item.get("text") else "")
                        head = ""
                        if "done" in item:
                            finished = True
                            yield out + chunk(None, item["done"]["finish_reason"]) + DONE
                            return
                        if out:
                            yield out
                    finished = True
                except Exception as err:  # headers are sent: report in-band, then end
                    finished = True
                    log.exception("stream failed")
                    message = str(err).strip().splitlines()[0] if str(err).strip() else "error"
                    error = {"error": {"message": message[:300], "type": "error"}}
                    head += f"data: {json.dumps(error)}\n\n"
                finally:
                    if not finished:  # the client went away: free the generator's slot now
                        stream.cancel()
                yield head + DONE

            return StreamingResponse(events(), media_type="text/event-stream")

    return OpenAIRoutes


async def _chain(first: list[Any], rest: Any) -> Any:
    """Items already taken from an async iterator, then the iterator's remaining ones."""
    for item in first:
        yield item
    async for item in rest:
        yield item


def chat_prompt(
    tokenizer: Any, messages: list[ChatMessage], tools: list[dict[str, Any]] | None, model: str
) -> str:
    """A text model's prompt for a chat request: each message checked as the dialogue task
    checks training rows (tool calls only on assistant messages, their arguments a JSON
    object or a string holding one), then rendered by the same function training uses, so the
    served prompt is the trained one. A message the template refuses is a 422."""
    from pydantic import ValidationError

    from tasks import RowError
    from tasks.dialogue import Message, render_chat

    rendered = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise HTTPException(422, f"messages.{i}.content: model '{model}' takes text only")
            content = "".join(p.text or "" for p in content)
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise HTTPException(422, f"messages.{i}.content: required for a '{m.role}' message")
        given = {**m.model_dump(exclude_none=True), "content": content}
        try:
            message = Message.model_validate(given)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in (f"messages.{i}", *first.get("loc", ())))
            reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            raise HTTPException(422, f"{where}: {reason}") from None
        rendered.append(message.model_dump(exclude_none=True))
    try:
        return render_chat(tokenizer, rendered, tools)
    except RowError as err:
        raise HTTPException(422, str(err)) from None


def response_body(
    rid: str, model: str, done: dict[str, Any], finish: str, chat: bool
) -> dict[str, Any]:
    """An OpenAI (chat) completion response body for a generator's finished ``done``."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": done["text"]}}
    else:
        choice = {"index": 0, "text": done["text"], "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{**choice, "finish_reason": finish}],
        "usage": _usage(done),
    }


def _usage(done: dict[str, Any]) -> dict[str, int]:
    return {
        "prompt_tokens": done["prompt_tokens"],
        "completion_tokens": done["completion_tokens"],
        "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
    }
