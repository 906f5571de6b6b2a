"""The taskray Ray Serve application: task deployments composed behind one FastAPI ingress.

``build_app`` is an application builder: Serve config files name it as
``import_path: serve.app:build_app`` with the ``AppArgs`` as ``args``, so ``serve run`` /
``serve deploy`` / ``taskray serve`` all deploy the same thing.
"""

import asyncio
import hmac
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import AppArgs, Limits, ServedModel
from serve.schemas import ClassifyRequest, ClassifyResponse, ModelCard, ModelList

log = logging.getLogger("ray.serve")

READY_TIMEOUT_S = 2.0


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
class TaskHead:
    """A task model (classification for now) that batches concurrent requests."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        from actors.bundle import load_bundle

        self.spec = ServedModel.model_validate(spec)
        device = self.spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # Replicas share the node's cores with each other and with Ray itself.
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        self.bundle = load_bundle(self.spec.bundle, device=device)
        self.batch_sizes: Counter[int] = Counter()
        self.classify.set_max_batch_size(self.spec.max_batch_size)
        self.classify.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        """What ``/v1/models`` shows of this model."""
        return {
            "id": self.spec.name,
            "task": self.bundle.task.name,
            "labels": self.bundle.task.labels,
        }

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

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def classify(self, items: list[tuple[str, bool]]) -> list[dict[str, Any]]:
        """Batched classification: each item is ``(text, return_all_scores)``."""
        from actors.inference import predict_classification

        self.batch_sizes[len(items)] += 1
        want_all = any(flag for _, flag in items)
        preds = await asyncio.to_thread(
            predict_classification, self.bundle, [t for t, _ in items], want_all
        )
        out = []
        for pred, (_, flag) in zip(preds, items, strict=True):
            if not flag:
                pred = {k: v for k, v in pred.items() if k != "scores"}
            out.append(pred)
        return out


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    """The one error shape of the API: ``{"error": {"message", "type"}}``."""
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


def make_api(limits: Limits) -> FastAPI:
    """The FastAPI app with error handlers and the body-size guard."""
    api = FastAPI(
        title="taskray",
        description="Task models served on Ray Serve.",
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
            exc.status_code, "error"
        )
        return error_response(exc.status_code, str(exc.detail), kind)

    @api.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return error_response(400, "invalid Content-Length header", "invalid_request")
            if size > limits.max_body_bytes:
                return error_response(
                    413,
                    f"request body of {size} bytes exceeds limits.max_body_bytes="
                    f"{limits.max_body_bytes}",
                    "too_large",
                )
        return await call_next(request)

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


def build_ingress(args: AppArgs) -> Any:
    """The ingress deployment class bound to these args' limits."""
    api = make_api(args.limits)
    limits = args.limits

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512)
    @serve.ingress(api)
    class Ingress:
        """HTTP front door: validates, authenticates, and fans out to task deployments."""

        def __init__(self, heads: dict[str, DeploymentHandle], tasks: dict[str, str]) -> None:
            self.heads = heads
            self.tasks = tasks
            self.api_key = load_api_key(args)

        def _auth(self, request: Request) -> None:
            if self.api_key is None:
                return
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                raise HTTPException(401, "missing or wrong API key (Authorization: Bearer ...)")

        def _pick(self, task: str, model: str | None) -> tuple[str, DeploymentHandle]:
            if model is not None:
                if model not in self.heads or self.tasks[model] != task:
                    raise HTTPException(404, f"model '{model}' does not serve task '{task}'")
                return model, self.heads[model]
            for name, t in self.tasks.items():
                if t == task:
                    return name, self.heads[name]
            raise HTTPException(404, f"no model serves task '{task}'")

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

            names = list(self.heads)
            results = await asyncio.gather(*(probe(self.heads[n]) for n in names))
            status = dict(zip(names, results, strict=True))
            code = 200 if all(results) else 503
            return JSONResponse(
                status_code=code,
                content={"ready": all(results), "models": status},
            )

        @api.get("/v1/models", response_model=ModelList)
        async def models(self, request: Request) -> ModelList:
            """The served models and their tasks."""
            self._auth(request)
            infos = await asyncio.gather(*(h.info.remote() for h in self.heads.values()))
            return ModelList(data=[ModelCard(**i) for i in infos])

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
            texts = [body.text] if body.text is not None else list(body.texts or [])
            field = "text" if body.text is not None else "texts"
            if not texts:
                raise HTTPException(422, "texts: must hold at least one text")
            if len(texts) > limits.max_batch_texts:
                raise HTTPException(
                    413,
                    f"texts: {len(texts)} items exceed limits.max_batch_texts="
                    f"{limits.max_batch_texts}",
                )
            for i, text in enumerate(texts):
                where = field if body.text is not None else f"texts.{i}"
                if not text.strip():
                    raise HTTPException(422, f"{where}: must not be empty")
                if len(text) > limits.max_text_chars:
                    raise HTTPException(
                        413,
                        f"{where}: {len(text)} characters exceed limits.max_text_chars="
                        f"{limits.max_text_chars}",
                    )
            name, handle = self._pick("classification", body.model)
            preds = await asyncio.gather(
                *(handle.classify.remote((t, body.return_all_scores)) for t in texts)
            )
            return ClassifyResponse(model=name, predictions=preds)

    return Ingress


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder: ``args`` is an ``AppArgs`` mapping."""
    parsed = AppArgs.model_validate(args)
    heads = {}
    tasks = {}
    for spec in parsed.models:
        heads[spec.name] = TaskHead.options(name=f"{spec.task}-{spec.name}").bind(spec.model_dump())
        tasks[spec.name] = spec.task
    return build_ingress(parsed).options(name="Ingress").bind(heads, tasks)
