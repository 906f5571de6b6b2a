"""The taskray Ray Serve application: task heads and generators composed behind one FastAPI
ingress.

``build_app`` is an application builder: Serve config files name it as
``import_path: serve.app:build_app`` with the ``AppArgs`` as ``args``, so ``serve run`` /
``serve deploy`` / ``taskray serve`` / a KubeRay RayService all deploy the same thing.

Routes: ``/v1/tasks/{task}`` for every family (``/v1/tasks/multimodal`` takes an image as JSON
base64 or a multipart upload), OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions``
(both streaming as server-sent events; image content parts for multimodal models) and
``/v1/models``, retrieval and RAG (with an optional image), plus ``/healthz`` and ``/readyz``.
Every limit is checked here, before a model sees the request.
"""

import asyncio
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from serve.batching import isolate_failures
from serve.config import AppArgs, Limits, ServedModel, replica_device
from serve.generator import generator_class
from serve.schemas import (
    ChatMessage,
    ChatRequest,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    EmbeddingsRequest,
    GenerationParameters,
    ModelCard,
    ModelList,
    MultimodalRequest,
    RagRequest,
    RetrieveRequest,
    RetrieveResponse,
    TaskRequest,
    TaskResponse,
)

log = logging.getLogger("ray.serve")

READY_TIMEOUT_S = 2.0
GENERATIVE_KINDS = ("causal_lm", "seq2seq_lm")
VLM_KIND = "vision_causal_lm"


# ----- task heads ---------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
class TaskHead:
    """An encoder task model (classification, NLI, NER, extractive QA) or a decoder classifier,
    batching concurrent requests. Long QA contexts are windowed as in training.

    Batches form while the model is busy: requests that arrive during a forward pass are all
    run in the next one (up to ``max_batch_size``), so batches grow with the load and nothing
    waits on a timer while requests are queued. When the model is idle, a request waits at most
    ``batch_wait_timeout_s`` from its arrival for others to join it. (``@serve.batch`` forms a
    batch every ``batch_wait_timeout_s`` whether or not the model is free, so under load it
    queues many small batches behind the running one; on CPU that measured 2-3 requests per
    batch at 32 concurrent clients instead of 8-12, and ~40% fewer requests/s.)
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        from collections import deque

        from actors.bundle import load_bundle

        self.spec = ServedModel.model_validate(spec)
        device = replica_device(self.spec)
        self.bundle = load_bundle(self.spec.bundle, device=device)
        self.batch_sizes: Counter[int] = Counter()
        self.max_batch_size = self.spec.max_batch_size
        self.batch_wait_timeout_s = self.spec.batch_wait_timeout_s
        # (item, future, arrival time) of requests not yet in a batch, oldest first.
        self._queue: deque[tuple[Any, asyncio.Future, float]] = deque()
        self._arrived: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None

    def info(self) -> dict[str, Any]:
        """What ``/v1/models`` shows of this model."""
        task = self.bundle.task
        return {"id": self.spec.name, "task": task.name, "labels": task.labels}

    def ready(self) -> bool:
        """The replica exists only once its model is loaded, so answering means ready."""
        return True

    def stats(self) -> dict[str, Any]:
        """How many batches of each size this replica has run (for tests and tuning)."""
        return {"batch_sizes": dict(self.batch_sizes)}

    def check_health(self) -> None:
        """Serve's periodic probe: fail if the model is gone."""
        if self.bundle is None or self.bundle.model is None:
            raise RuntimeError("model not loaded")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot batching settings from the Serve config's ``user_config``."""
        if "max_batch_size" in user_config:
            self.max_batch_size = max(1, int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.batch_wait_timeout_s = max(0.0, float(user_config["batch_wait_timeout_s"]))

    async def predict(self, item: tuple[dict[str, Any], bool]) -> dict[str, Any]:
        """One prediction, run in a batch with concurrent ones: ``item`` is ``(validated row,
        return_all_scores)``."""
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.done():
            self._arrived = asyncio.Event()
            self._batcher = loop.create_task(self._run_batches(self._arrived))
        future = loop.create_future()
        self._queue.append((item, future, loop.time()))
        assert self._arrived is not None
        self._arrived.set()
        return await future

    async def _run_batches(self, arrived: asyncio.Event) -> None:
        """The batching loop: one forward pass at a time, over whatever has queued up."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                arrived.clear()
                await arrived.wait()
            # The oldest request waits at most batch_wait_timeout_s (from its arrival) for
            # the batch to fill; requests that queued during the last forward have waited.
            deadline = self._queue[0][2] + self.batch_wait_timeout_s
            while len(self._queue) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), remaining)
                except asyncio.TimeoutError:  # not yet the builtin one on Python 3.10
                    break
            taken = [
                self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))
            ]
            batch = [(item, future) for item, future, _ in taken if not future.done()]
            if not batch:  # every caller gave up (cancelled) while queued
                continue
            self.batch_sizes[len(batch)] += 1
            # In a thread, so that requests keep queueing while the model runs.
            preds = await asyncio.to_thread(
                isolate_failures, self._predict_batch, [item for item, _ in batch]
            )
            for (_, future), pred in zip(batch, preds, strict=True):
                if future.done():
                    continue
                if isinstance(pred, Exception):  # this request's own failure
                    future.set_exception(pred)
                else:
                    future.set_result(pred)

    def _predict_batch(self, items: list[tuple[dict[str, Any], bool]]) -> list[dict[str, Any]]:
        """One forward pass over the batch's rows."""
        from actors.inference import predict_rows

        want_all = any(flag for _, flag in items)
        preds = predict_rows(self.bundle, [r for r, _ in items], all_scores=want_all)
        if len(preds) != len(items):
            raise RuntimeError(f"{len(preds)} predictions for a batch of {len(items)} rows")
        out = []
        for pred, (_, flag) in zip(preds, items, strict=True):
            if not flag and "scores" in pred:
                pred = {k: v for k, v in pred.items() if k != "scores"}
            out.append(pred)
        return out


# ----- errors, limits, auth -----------------------------------------------------------------
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


def _draining() -> Draining:
    """The replica's one :class:`Draining`, looked up in the imported module: this class body
    is defined inside ``build_ingress`` and so is pickled by value, global names included, and
    a global read from it would be a copy the request guard never sees."""
    from serve import app

    return app.DRAINING


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
        if _overloaded(exc):
            # The generator's queue is full (scheduler.max_queued): back off and retry.
            response = error_response(503, _first_line(exc), "overloaded")
            response.headers["Retry-After"] = "1"
            return response
        if _replica_lost(exc):
            # The replica died (or is unreachable) while it held this request: nothing is
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


def describe_model(spec: ServedModel) -> dict[str, Any]:
    """What the ingress needs to know of a model without loading it: its task spec, model
    kind and tokenizer directory (read from the bundle's manifest or the HF config)."""
    from actors.bundle import MANIFEST, read_manifest
    from actors.modeling import resolve_model_path
    from tasks import get_task

    path = Path(resolve_model_path(spec.bundle))
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        task_spec = manifest["task"]
        if spec.task is not None and spec.task != task_spec["name"]:
            raise ValueError(
                f"model '{spec.name}': bundle {path} was trained for task "
                f"'{task_spec['name']}', not '{spec.task}'"
            )
        return {"task": task_spec, "kind": manifest["model_kind"], "path": str(path)}
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"model '{spec.name}': {path} is neither a taskray bundle nor a HF model directory"
        )
    seq2seq = bool(json.loads(config.read_text()).get("is_encoder_decoder"))
    task = get_task(spec.task or "generation")
    if task.model_kind not in GENERATIVE_KINDS:
        raise ValueError(
            f"model '{spec.name}': a plain model directory serves generative tasks only; "
            f"train a bundle for '{task.name}'"
        )
    kind = "seq2seq_lm" if seq2seq else "causal_lm"
    return {"task": task.spec(), "kind": kind, "path": str(path)}


def _is_generator(meta: dict[str, Any]) -> bool:
    return meta["kind"] in GENERATIVE_KINDS and meta["task"].get("formulation") != "decoder"


def _is_vlm(meta: dict[str, Any]) -> bool:
    return meta["kind"] == VLM_KIND


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


# ----- ingress ------------------------------------------------------------------------------
def build_ingress(args: AppArgs) -> Any:
    """The ingress deployment class bound to these args' limits."""
    api = make_api(args)
    limits = args.limits

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512)
    @serve.ingress(api)
    class Ingress:
        """HTTP front door: validates, authenticates, and fans out to the model deployments."""

        def __init__(
            self,
            handles: dict[str, DeploymentHandle],
            metas: dict[str, dict[str, Any]],
            retriever: DeploymentHandle | None = None,
            rag: DeploymentHandle | None = None,
        ) -> None:
            from transformers import AutoTokenizer

            from tasks import get_task, task_from_spec

            self.handles = handles
            self.metas = metas
            self.retriever = retriever
            self.rag = rag
            self.specs = {m.name: m for m in args.models}
            self.tasks = {name: task_from_spec(meta["task"]) for name, meta in metas.items()}
            # family → Task for every family a model answers (its own + also_serves).
            self.families: dict[str, dict[str, Any]] = {
                name: {t.name: t, **{f: get_task(f) for f in self.specs[name].also_serves}}
                for name, t in self.tasks.items()
            }
            # Tokenizers (small) live here too: prompts are built and token limits checked
            # before any request reaches a model.
            self.tokenizers = {
                name: AutoTokenizer.from_pretrained(meta["path"], trust_remote_code=False)
                for name, meta in metas.items()
                if _is_generator(meta)
            }
            self.adapters = {a: m.name for m in args.models for a in m.adapters}
            self.api_key = load_api_key(args)

        # ----- helpers ----------------------------------------------------------------------
        def _auth(self, request: Request) -> None:
            if self.api_key is None:
                return
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                raise HTTPException(401, "missing or wrong API key (Authorization: Bearer ...)")

        def _pick(self, task: str, model: str | None) -> str:
            """The served model for ``task``: the named one, or the first that serves it."""
            if model is not None:
                base = self.adapters.get(model, model)
                if base not in self.families or task not in self.families[base]:
                    raise HTTPException(404, f"model '{model}' does not serve task '{task}'")
                return model
            for name, families in self.families.items():
                if task in families:
                    return name
            raise HTTPException(404, f"no model serves task '{task}'")

        def _generator(self, model: str) -> tuple[str, DeploymentHandle, str | None]:
            """(base name, handle, adapter) for an OpenAI ``model`` field."""
            base = self.adapters.get(model, model)
            if base not in self.metas:
                known = ", ".join(sorted([*self.metas, *self.adapters]))
                raise HTTPException(404, f"model '{model}' not found (served: {known})")
            if _is_vlm(self.metas[base]):
                raise HTTPException(
                    422,
                    f"model '{model}' is multimodal: use /v1/tasks/multimodal, or "
                    "/v1/chat/completions with an image_url content part",
                )
            if not _is_generator(self.metas[base]):
                raise HTTPException(
                    422, f"model '{model}' is a {self.tasks[base].name} head, not a generator"
                )
            adapter = model if model in self.adapters else None
            return base, self.handles[base], adapter

        def _params(self, base: str, given: dict[str, Any]) -> dict[str, Any]:
            defaults = self.specs[base].generation
            params = {k: v for k, v in given.items() if v is not None}
            out = {**defaults.model_dump(), **params}
            if out["max_new_tokens"] > limits.max_new_tokens:
                raise HTTPException(
                    422,
                    f"max_tokens: {out['max_new_tokens']} exceeds limits.max_new_tokens="
                    f"{limits.max_new_tokens}",
                )
            stop = out.get("stop") or ()
            out["stop"] = tuple([stop] if isinstance(stop, str) else stop)
            if len(out["stop"]) > 4:
                raise HTTPException(422, f"stop: at most 4 sequences, got {len(out['stop'])}")
            return out

        def _check_prompt(self, base: str, prompt: str, where: str) -> None:
            if len(prompt) > limits.max_text_chars * 4:
                raise HTTPException(
                    413,
                    f"{where}: {len(prompt)} characters exceed the prompt limit "
                    f"(4 × limits.max_text_chars={limits.max_text_chars})",
                )
            count = len(self.tokenizers[base](prompt, add_special_tokens=False)["input_ids"])
            if count > limits.max_input_tokens:
                raise HTTPException(
                    413,
                    f"{where}: {count} prompt tokens exceed limits.max_input_tokens="
                    f"{limits.max_input_tokens}",
                )

        def _rows(self, body: TaskRequest, task: Any) -> list[dict[str, Any]]:
            given = [
                f for f in ("input", "inputs", "text", "texts") if getattr(body, f) is not None
            ]
            if len(given) != 1:
                raise HTTPException(422, "give exactly one of 'input', 'inputs', 'text' or 'texts'")
            field = given[0]
            if field == "input":
                raw, names = [body.input], ["input"]
            elif field == "inputs":
                raw = list(body.inputs or [])
                names = [f"inputs.{i}" for i in range(len(raw))]
            elif field == "text":
                raw, names = [{"text": body.text}], ["text"]
            else:
                raw = [{"text": t} for t in body.texts or []]
                names = [f"texts.{i}" for i in range(len(raw))]
            if not raw:
                raise HTTPException(422, f"{field}: must hold at least one item")
            if len(raw) > limits.max_batch_texts:
                raise HTTPException(
                    413,
                    f"{field}: {len(raw)} items exceed limits.max_batch_texts="
                    f"{limits.max_batch_texts}",
                )
            from tasks import RowError

            rows = []
            for row, name in zip(raw, names, strict=True):
                for key, value in row.items():
                    if isinstance(value, str) and len(value) > limits.max_text_chars:
                        where = name if field in ("text", "texts") else f"{name}.{key}"
                        raise HTTPException(
                            413,
                            f"{where}: {len(value)} characters exceed limits.max_text_chars="
                            f"{limits.max_text_chars}",
                        )
                try:
                    clean = task.validate(row)
                except RowError as err:
                    where = name if field in ("text", "texts") else f"{name}.{err.field}"
                    reason = err.reason.removeprefix("Value error, ")
                    raise HTTPException(422, f"{where}: {reason}") from None
                if field in ("text", "texts") and not str(clean.get("text", "")).strip():
                    raise HTTPException(422, f"{name}: must not be empty")
                rows.append(clean)
            return rows

        # ----- lifecycle (handle calls from `taskray serve`, not HTTP routes) ---------------
        async def drain(self) -> dict[str, Any]:
            """Stop taking new HTTP requests on this replica; report what is still in flight."""
            _draining().draining = True
            return await self.in_flight()

        async def in_flight(self) -> dict[str, Any]:
            """This replica's id, whether it drains, and its HTTP requests in flight."""
            state = _draining()
            return {
                "replica": serve.get_replica_context().replica_id.unique_id,
                "draining": state.draining,
                "in_flight": state.in_flight,
            }

        # ----- health -----------------------------------------------------------------------
        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            """Alive (the process answers)."""
            return {"status": "ok"}

        @api.get("/readyz")
        async def readyz(self) -> JSONResponse:
            """200 only once every model deployment answers."""

            async def probe(handle: DeploymentHandle) -> bool:
                try:
                    return bool(
                        await asyncio.wait_for(handle.ready.remote(), timeout=READY_TIMEOUT_S)
                    )
                except Exception:
                    return False

            probes = dict(self.handles)
            if self.retriever is not None:
                probes["retriever"] = self.retriever
            if self.rag is not None:
                probes["rag"] = self.rag
            names = list(probes)
            results = await asyncio.gather(*(probe(probes[n]) for n in names))
            status = dict(zip(names, results, strict=True))
            return JSONResponse(
                status_code=200 if all(results) else 503,
                content={"ready": all(results), "models": status},
            )

        # ----- playground (serve/playground.html; not part of the API's schema) -------------
        @api.get("/", include_in_schema=False)
        async def root(self) -> HTMLResponse:
            """The playground page."""
            return self._playground()

        @api.get("/playground", include_in_schema=False)
        async def playground(self) -> HTMLResponse:
            """The playground page: try every served model in a browser."""
            return self._playground()

        def _playground(self) -> HTMLResponse:
            from serve import playground

            return HTMLResponse(playground.page(), headers=playground.headers())

        # ----- models -----------------------------------------------------------------------
        @api.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
        async def models(self, request: Request) -> ModelList:
            """Served models and their adapters (OpenAI's list shape, with each one's task)."""
            self._auth(request)
            cards = []
            for name, task in self.tasks.items():
                also = list(self.specs[name].also_serves) or None
                cards.append(ModelCard(id=name, task=task.name, labels=task.labels, also=also))
                for adapter in self.specs[name].adapters:
                    cards.append(ModelCard(id=adapter, task=task.name, parent=name, also=also))
            return ModelList(data=cards)

        # ----- task routes ------------------------------------------------------------------
        @api.post(
            "/v1/tasks/classification",
            response_model=ClassifyResponse,
            response_model_exclude_none=True,
        )
        async def classification(self, body: ClassifyRequest, request: Request) -> ClassifyResponse:
            """Classify ``text`` or ``texts``; concurrent requests share model batches."""
            self._auth(request)
            if (body.text is None) == (body.texts is None):
                raise HTTPException(422, "give exactly one of 'text' or 'texts'")
            name = self._pick("classification", body.model)
            task = self.families[self.adapters.get(name, name)]["classification"]
            rows = self._rows(TaskRequest(text=body.text, texts=body.texts), task)
            preds = await self._predict(name, "classification", rows, body.return_all_scores)
            return ClassifyResponse(model=name, predictions=preds)

        async def _predict(
            self,
            name: str,
            family: str,
            rows: list[dict[str, Any]],
            all_scores: bool = False,
            parameters: GenerationParameters | None = None,
        ) -> list[dict[str, Any]]:
            base = self.adapters.get(name, name)
            meta = self.metas[base]
            if not _is_generator(meta):
                handle = self.handles[base]
                return list(
                    await asyncio.gather(*(handle.predict.remote((r, all_scores)) for r in rows))
                )
            task = self.families[base][family]
            tok = self.tokenizers[base]
            prompts = [task.generation_prompt(r, tok) for r in rows]
            for i, prompt in enumerate(prompts):
                self._check_prompt(base, prompt, f"inputs.{i}" if len(prompts) > 1 else "input")
            params = self._params(base, (parameters or GenerationParameters()).model_dump())
            _, handle, adapter = self._generator(name)
            if adapter:
                handle = handle.options(multiplexed_model_id=adapter)
            done = await asyncio.gather(*(handle.complete.remote(p, params) for p in prompts))
            return task.decode([d["text"] for d in done], rows)

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
            if not _is_vlm(meta):
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
                data = check_image(await upload.read(), limits)
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
            return image_bytes(body.image, limits), body

        async def _vlm_answer(
            self, name: str, data: bytes, prompt: str, params: dict[str, Any]
        ) -> dict[str, Any]:
            try:
                return await self.handles[name].answer.remote(data, prompt, params)
            except ValueError as err:  # the replica's own image check
                raise HTTPException(422, _first_line(err)) from None

        @api.post("/v1/tasks/{task}", response_model=TaskResponse)
        async def run_task(self, task: str, body: TaskRequest, request: Request) -> TaskResponse:
            """Any task family: rows in the family's schema → predictions in its output shape
            (``taskray tasks`` lists the schemas)."""
            from tasks import TASKS

            self._auth(request)
            if task not in TASKS:
                known = ", ".join(sorted(TASKS))
                raise HTTPException(404, f"unknown task '{task}' (known: {known})")
            name = self._pick(task, body.model)
            rows = self._rows(body, self.families[self.adapters.get(name, name)][task])
            preds = await self._predict(name, task, rows, body.return_all_scores, body.parameters)
            return TaskResponse(model=name, task=task, predictions=preds)

        # ----- OpenAI-compatible ------------------------------------------------------------
        def _openai_params(self, base: str, body: Any) -> dict[str, Any]:
            return self._params(
                base,
                {
                    "max_new_tokens": body.max_completion_tokens or body.max_tokens,
                    "temperature": body.temperature,
                    "top_p": body.top_p,
                    "top_k": body.top_k,
                    "stop": body.stop,
                    "seed": body.seed,
                },
            )

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
            if adapter:
                handle = handle.options(multiplexed_model_id=adapter)
            rid = f"cmpl-{uuid.uuid4().hex[:24]}"
            if body.stream:
                return await self._sse(handle, prompt, params, rid, body.model, chat=False)
            done = await handle.complete.remote(prompt, params)
            return {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "text": done["text"],
                        "finish_reason": done["finish_reason"],
                        "logprobs": None,
                    }
                ],
                "usage": _usage(done),
            }

        @api.post("/v1/chat/completions")
        async def chat_completions(self, body: ChatRequest, request: Request) -> Any:
            """OpenAI-compatible chat (the model's chat template; ``stream: true`` for SSE).
            A multimodal model takes one ``image_url`` part (a data URI) and answers the last
            user message's text about it."""
            self._auth(request)
            vlm = self.adapters.get(body.model, body.model)
            if vlm in self.metas and _is_vlm(self.metas[vlm]):
                return await self._vlm_chat(body)
            base, handle, adapter = self._generator(body.model)
            if len(body.messages) > limits.max_messages:
                raise HTTPException(
                    413,
                    f"messages: {len(body.messages)} exceed limits.max_messages="
                    f"{limits.max_messages}",
                )
            tok = self.tokenizers[base]
            if not getattr(tok, "chat_template", None):
                raise HTTPException(
                    422, f"model '{body.model}' has no chat template; use /v1/completions"
                )
            messages = []
            for i, m in enumerate(body.messages):
                if isinstance(m.content, str):
                    text = m.content
                else:
                    if any(p.type != "text" for p in m.content):
                        raise HTTPException(
                            422, f"messages.{i}.content: model '{body.model}' takes text only"
                        )
                    text = "".join(p.text or "" for p in m.content)
                messages.append({"role": m.role, "content": text})
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            self._check_prompt(base, prompt, "messages")
            params = self._openai_params(base, body)
            if adapter:
                handle = handle.options(multiplexed_model_id=adapter)
            rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            if body.stream:
                return await self._sse(handle, prompt, params, rid, body.model, chat=True)
            done = await handle.complete.remote(prompt, params)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done["text"]},
                        "finish_reason": done["finish_reason"],
                    }
                ],
                "usage": _usage(done),
            }

        async def _vlm_chat(self, body: ChatRequest) -> Any:
            images, prompt = _vlm_messages(body.messages)
            if len(images) != 1:
                raise HTTPException(
                    422,
                    f"messages: model '{body.model}' needs exactly one image_url part, "
                    f"got {len(images)}",
                )
            where, url = images[0]
            data = image_bytes(url, limits, where)
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
            return {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done["text"]},
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(done),
            }

        # ----- retrieval and RAG ------------------------------------------------------------
        def _need(self, handle: DeploymentHandle | None, what: str) -> DeploymentHandle:
            if handle is None:
                raise HTTPException(
                    404, f"{what} is not configured on this server (see retrieval in the config)"
                )
            return handle

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
            if len(texts) > limits.max_batch_texts:
                raise HTTPException(
                    413,
                    f"input: {len(texts)} items exceed limits.max_batch_texts="
                    f"{limits.max_batch_texts}",
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
            generator = (
                args.retrieval.rag.generator if args.retrieval and args.retrieval.rag else None
            )
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
            vlm = args.retrieval.rag.vlm if args.retrieval and args.retrieval.rag else None
            if vlm is None:
                raise HTTPException(
                    422, "image: this RAG pipeline has no vlm (set retrieval.rag.vlm)"
                )
            if body.stream or body.mode != "generate":
                raise HTTPException(
                    422, "image: answers with an image are not streamed and use the generate mode"
                )
            data = image_bytes(body.image or "", limits)
            params = self._params(vlm, (body.parameters or GenerationParameters()).model_dump())
            try:
                return await rag.answer_with_image.remote(
                    body.question, data, body.k, body.filters, params
                )
            except ValueError as err:
                raise HTTPException(422, _first_line(err)) from None

        def _text_limit(self, text: str, where: str) -> None:
            if len(text) > limits.max_text_chars:
                raise HTTPException(
                    413,
                    f"{where}: {len(text)} characters exceed limits.max_text_chars="
                    f"{limits.max_text_chars}",
                )

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
            # The generator's first item says it accepted the request: a full queue (503) or a
            # bad request is answered with its status before any event is sent.
            first = await stream.__anext__()

            async def events() -> Any:
                finished = False
                try:
                    if chat:
                        yield chunk(None, None, first=True)
                    pending = [] if "queued" in first else [first]
                    async for item in _chain(pending, stream):
                        if "text" in item:
                            yield chunk(item["text"], None)
                        elif "done" in item:
                            yield chunk(None, item["done"]["finish_reason"])
                    finished = True
                except Exception as err:  # headers are sent: report in-band, then end
                    finished = True
                    log.exception("stream failed")
                    message = str(err).strip().splitlines()[0] if str(err).strip() else "error"
                    error = {"error": {"message": message[:300], "type": "error"}}
                    yield f"data: {json.dumps(error)}\n\n"
                finally:
                    if not finished:  # the client went away: free the generator's slot now
                        stream.cancel()
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

    return Ingress


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    """OpenAI's embedding encodings: a float list, or base64 of little-endian float32 (what
    the official client asks for by default)."""
    if encoding == "float":
        return vector
    import base64

    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _replica_lost(err: BaseException) -> bool:
    """Whether a request failed because the replica running it died or became unreachable
    (Ray's ``RayActorError`` family), raised as is or as the cause of a Ray/Serve wrapper."""
    from ray.exceptions import RayActorError

    return any(
        isinstance(e, RayActorError) for e in (err, getattr(err, "cause", None), err.__cause__)
    )


def _overloaded(err: BaseException) -> bool:
    """Whether a generator refused the request because its queue is full."""
    from actors.engine import EngineOverloaded

    return any(
        isinstance(e, EngineOverloaded) for e in (err, getattr(err, "cause", None), err.__cause__)
    )


async def _chain(first: list[Any], rest: Any) -> Any:
    """Items already taken from an async iterator, then the iterator's remaining ones."""
    for item in first:
        yield item
    async for item in rest:
        yield item


def _first_line(err: BaseException) -> str:
    """A replica's exception as one line: Ray re-raises it as a subclass that carries the
    original as ``cause`` (its own ``str`` holds a traceback)."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip()
    return (text.splitlines()[0] if text else type(cause).__name__)[:300]


async def _rag_events(stream: Any) -> Any:
    """Server-sent events of a streamed RAG answer, ending with ``[DONE]``."""
    try:
        async for item in stream:
            yield f"data: {json.dumps(item)}\n\n"
    except Exception as err:  # headers are sent: report in-band, then end
        error = {"error": {"message": _first_line(err), "type": "error"}}
        yield f"data: {json.dumps(error)}\n\n"
    yield "data: [DONE]\n\n"


def _validation_line(err: Any) -> str:
    """A pydantic ``ValidationError`` as ``field: message`` (its first error)."""
    first = err.errors()[0] if err.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('msg', '')}"
    return f"{loc}: {first.get('msg', 'invalid')}"


def _vlm_messages(messages: list[ChatMessage]) -> tuple[list[tuple[str, str]], str]:
    """The ``image_url`` parts (where, url) of a chat and the last user message's text."""
    images: list[tuple[str, str]] = []
    text = ""
    for i, message in enumerate(messages):
        parts = message.content
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


def _usage(done: dict[str, Any]) -> dict[str, int]:
    return {
        "prompt_tokens": done["prompt_tokens"],
        "completion_tokens": done["completion_tokens"],
        "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
    }


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder: ``args`` is an ``AppArgs`` mapping."""
    from tasks import get_task

    parsed = AppArgs.model_validate(args)
    handles = {}
    metas = {}
    for spec in parsed.models:
        meta = describe_model(spec)
        metas[spec.name] = meta
        family = meta["task"]["name"]
        resources = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}
        if _is_vlm(meta):
            if spec.also_serves or spec.adapters:
                raise ValueError(
                    f"model '{spec.name}': also_serves and adapters apply to text generators only"
                )
            from serve.vlm import VisionLanguage

            lim = parsed.limits
            handles[spec.name] = VisionLanguage.options(
                name=f"vlm-{spec.name}", ray_actor_options=resources
            ).bind(spec.model_dump(), lim.max_image_bytes, lim.max_image_pixels)
        elif _is_generator(meta):
            for extra in spec.also_serves:
                if get_task(extra).model_kind not in GENERATIVE_KINDS:
                    raise ValueError(
                        f"model '{spec.name}': also_serves '{extra}' is not a generative task"
                    )
            deployment = generator_class(spec.max_adapters)
            handles[spec.name] = deployment.options(
                name=f"generator-{spec.name}", ray_actor_options=resources
            ).bind(spec.model_dump())
        else:
            if spec.also_serves or spec.adapters:
                raise ValueError(
                    f"model '{spec.name}': also_serves and adapters apply to generators only"
                )
            handles[spec.name] = TaskHead.options(
                name=f"{family}-{spec.name}", ray_actor_options=resources
            ).bind(spec.model_dump())
    retriever = rag = None
    if parsed.retrieval is not None:
        from serve.rag import RagPipeline
        from serve.retriever import Retriever

        r = parsed.retrieval
        retriever = Retriever.options(
            name="retriever", ray_actor_options={"num_cpus": r.num_cpus}
        ).bind(r.embedder, r.qdrant, r.default_k, r.max_k)
        if r.rag is not None:
            gen = r.rag.generator
            by_name = {m.name: m for m in parsed.models}
            for role, name in (("generator", gen), ("reader", r.rag.reader), ("vlm", r.rag.vlm)):
                if name is None:
                    continue
                if name not in metas:
                    raise ValueError(f"retrieval.rag.{role}: no served model named '{name}'")
                if role == "vlm":
                    if not _is_vlm(metas[name]):
                        raise ValueError(f"retrieval.rag.vlm: '{name}' is not multimodal")
                    continue
                kind_ok = _is_generator(metas[name]) == (role == "generator")
                if not kind_ok or (
                    role == "reader" and metas[name]["task"]["name"] != "extractive_qa"
                ):
                    raise ValueError(f"retrieval.rag.{role}: '{name}' cannot be the {role}")
            rag = RagPipeline.options(
                name="rag", ray_actor_options={"num_cpus": r.rag.num_cpus}
            ).bind(
                retriever,
                handles[gen] if gen else None,
                handles[r.rag.reader] if r.rag.reader else None,
                # Passages are counted in the tokens of the model that reads them.
                metas[gen]["path"] if gen else (metas[r.rag.vlm]["path"] if r.rag.vlm else None),
                r.rag.passage_budget,
                r.default_k,
                r.max_k,
                by_name[gen].generation.model_dump() if gen else None,
                parsed.limits.max_new_tokens,
                r.rag.chat,
                vlm=handles[r.rag.vlm] if r.rag.vlm else None,
            )
    return build_ingress(parsed).options(name="Ingress").bind(handles, metas, retriever, rag)
