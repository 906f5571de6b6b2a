"""The ingress's front door, before any route runs: the request guard (API key, body size,
unencodable text, refusal while draining), the one error shape of the API, and the FastAPI app
with its exception handlers (a full generator queue or a lost replica → 503 + Retry-After).
"""

import hmac
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serve.config import AppArgs

log = logging.getLogger("ray.serve")


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    """The one error shape of the API: ``{"error": {"message", "type"}}``. The message is one
    printable line: names the caller sent (fields, models, tasks) are echoed in it, and their
    control characters and lone surrogates are escaped (``\\n``, ``\\x1b``, ``\\ud800``)."""
    return JSONResponse(
        status_code=status, content={"error": {"message": _printable(message), "type": kind}}
    )


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


#: Routes open without the API key: the health checks, the API's own documentation and the
#: playground page (which holds no secret: its API calls send the key typed into it).
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    | {"/", "/playground"}
)
#: A JSON escape of a UTF-16 surrogate; only a body holding one can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class Draining:
    """This replica's part in a graceful stop: whether it still takes new requests, and how
    many HTTP requests (streams included, until their last byte) are in flight. One per
    replica process; ``taskray serve`` sets it through ``Ingress.drain`` on SIGTERM, then waits
    for ``in_flight`` to reach 0 before Serve is shut down (Serve kills its proxies at once)."""

    draining: bool = False
    in_flight: int = 0


DRAINING = Draining()


class RequestGuard:
    """ASGI middleware in front of every route, before FastAPI reads or parses anything:

    0. while the replica drains, every route but ``/healthz`` answers 503 with
       ``Retry-After`` (``/readyz`` included, so load balancers stop sending traffic);
    1. the API key (when one is configured), so a request without it gets 401 whatever its
       body — it is never parsed or validated for a caller who may not use the API;
    2. ``limits.max_body_bytes`` counted on the bytes as they arrive, so a chunked body (no
       Content-Length) is refused as soon as it is too large instead of being read whole;
    3. JSON that decodes to lone UTF-16 surrogates (``"\\ud800"``: valid JSON syntax, but
       not encodable as UTF-8, so tokenizers and JSON responses fail on it): 422.

    The body (at most ``max_body_bytes``) is then handed to the app unchanged.
    """

    def __init__(self, app: Any, args: AppArgs) -> None:
        self.app = app
        self.limit = args.limits.max_body_bytes
        # Built in the replica (on its first request), where the key's variable or file is.
        self.api_key = load_api_key(args)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if DRAINING.draining and scope["path"].rstrip("/").rsplit("/", 1)[-1] != "healthz":
            response = error_response(503, "the server is shutting down; retry shortly",
                                      "unavailable")  # fmt: skip
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)
            return
        DRAINING.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            DRAINING.in_flight -= 1

    async def _guarded(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path not in PUBLIC_PATHS and not self._authorized(headers.get("authorization", "")):
            await _respond(401, "missing or wrong API key (Authorization: Bearer ...)",
                           "unauthorized", scope, receive, send)  # fmt: skip
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _respond(400, "invalid Content-Length header", "invalid_request",
                               scope, receive, send)  # fmt: skip
                return
            if int(length) > self.limit:
                await self._too_large(int(length), scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(size, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _SURROGATE_ESCAPE.search(body) and "json" in headers.get("content-type", "json"):
            where = _lone_surrogate(body)
            if where is not None:
                await _respond(422, f"{where}: contains an unpaired UTF-16 surrogate (\\ud800-"
                               "\\udfff), which is not text", "invalid_request",
                               scope, receive, send)  # fmt: skip
                return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, header: str) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    async def _too_large(self, size: int, scope: Any, receive: Any, send: Any) -> None:
        await _respond(413, f"request body of {size} bytes exceeds limits.max_body_bytes="
                       f"{self.limit}", "too_large", scope, receive, send)  # fmt: skip


async def _respond(status: int, message: str, kind: str, *asgi: Any) -> None:
    await error_response(status, message, kind)(*asgi)


def _lone_surrogate(body: bytes) -> str | None:
    """Where in a JSON body a string (or key) holds a lone surrogate: ``"field.0.key"``, or
    ``"body"`` for the top level; ``None`` when there is none (or the body is not JSON)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None  # FastAPI reports malformed or too deeply nested JSON itself

    def find(node: Any, path: tuple[str, ...]) -> tuple[str, ...] | None:
        if isinstance(node, str):
            return path if not _encodes(node) else None
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(
            node, list) else ()  # fmt: skip
        for key, child in items:
            if isinstance(key, str) and not _encodes(key):
                return (*path, _printable(key))
            found = find(child, (*path, str(key)))
            if found is not None:
                return found
        return None

    try:
        found = find(value, ())
    except RecursionError:
        return None
    return None if found is None else ".".join(found) or "body"


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def make_api(args: AppArgs) -> FastAPI:
    """The FastAPI app with error handlers and the request guard (key, size, text)."""
    api = FastAPI(
        title="taskray",
        description="Task models and generators served on Ray Serve.",
        version="0.1.0",
    )

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return error_response(422, f"malformed JSON body: {msg}", "invalid_json")
        return error_response(422, f"{loc}: {msg}", "invalid_request")

    @api.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = {401: "unauthorized", 404: "not_found", 413: "too_large"}.get(
            exc.status_code, "invalid_request" if exc.status_code == 422 else "error"
        )
        return error_response(exc.status_code, str(exc.detail), kind)

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        from ray.exceptions import RayActorError

        from actors.engine import EngineOverloaded, RequestTooLarge

        if _raised(exc, RequestTooLarge):
            # prompt + max_tokens (x the model's beams) past the generator's scheduler limits
            return error_response(413, _first_line(exc), "invalid_request")
        if _raised(exc, EngineOverloaded):
            # The generator's queue is full (scheduler.max_queued): back off and retry.
            response = error_response(503, _first_line(exc), "overloaded")
            response.headers["Retry-After"] = "1"
            return response
        if _raised(exc, RayActorError):
            # The replica died (or is unreachable) while it held this request (Ray's
            # RayActorError family, raised as is or as a wrapper's cause): nothing is
            # wrong with the request, and Serve is replacing the replica — a retry succeeds.
            log.warning("a model replica was lost while answering: %s", _first_line(exc))
            response = error_response(
                503, "the model replica was lost while answering; retry the request",
                "unavailable",
            )  # fmt: skip
            response.headers["Retry-After"] = "1"
            return response
        # A model that raises answers this request with one line; the replica lives on.
        log.exception("request failed")
        return error_response(500, f"the model failed on this request: {_first_line(exc)}", "error")

    api.add_middleware(RequestGuard, args=args)

    return api


def load_api_key(args: AppArgs) -> str | None:
    """The configured API key, from a file or an environment variable (never from YAML)."""
    if args.api_key_file:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"api_key_file {path} does not exist")
        key = path.read_text().strip()
        return key or None
    if args.api_key_env:
        return os.environ.get(args.api_key_env) or None
    return None


def _raised(err: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``err`` is a ``kind``, raised as is or as the cause of a Ray/Serve wrapper
    (Ray re-raises a replica's exception as a subclass that carries it as ``cause``)."""
    return any(isinstance(e, kind) for e in (err, getattr(err, "cause", None), err.__cause__))


def _first_line(err: BaseException) -> str:
    """A replica's exception as one line: Ray re-raises it as a subclass that carries the
    original as ``cause`` (its own ``str`` holds a traceback)."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip()
    return (text.splitlines()[0] if text else type(cause).__name__)[:300]


def _validation_line(err: Any) -> str:
    """A pydantic ``ValidationError`` as ``field: message`` (its first error)."""
    first = err.errors()[0] if err.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('msg', '')}"
    return f"{loc}: {first.get('msg', 'invalid')}"
