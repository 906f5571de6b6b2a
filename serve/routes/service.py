"""Service routes: liveness and readiness, the playground page, and the list of served models."""

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray.serve.handle import DeploymentHandle

from serve.ingress import READY_TIMEOUT_S, IngressCore
from serve.schemas import ModelCard, ModelList


def service_routes(api: FastAPI) -> type[IngressCore]:
    """The route mixin, its routes registered on ``api`` (the ingress's FastAPI app)."""

    class ServiceRoutes(IngressCore):
        """``/healthz``, ``/readyz``, ``/`` and ``/playground``, ``/v1/models``."""

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

    return ServiceRoutes
