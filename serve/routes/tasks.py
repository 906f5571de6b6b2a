"""Task routes: ``/v1/tasks/{task}`` for every family and the classification shortcut; task heads
batch in their replicas, generative families go through the generator's engine."""

import asyncio
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from serve.ingress import IngressCore, is_generator
from serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    GenerationParameters,
    TaskRequest,
    TaskResponse,
)


def task_routes(api: FastAPI) -> type[IngressCore]:
    """The route mixin, its routes registered on ``api`` (the ingress's FastAPI app)."""

    class TaskRoutes(IngressCore):
        """``/v1/tasks/classification`` and ``/v1/tasks/{task}``."""

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
            if not is_generator(meta):
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

    return TaskRoutes
