"""What every route of the ingress shares: the models it fronts, their tokenizers, and the
checks a request passes before a model sees it (API key, model and adapter lookup, generation
parameters within limits, prompt and text sizes, task rows). The route families in
``serve/routes/`` are mixins over :class:`IngressCore`; ``serve.app.build_ingress`` composes
them into the one Serve ingress deployment.
"""

import hmac
from typing import Any

from fastapi import HTTPException, Request
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import AppArgs
from serve.guard import DRAINING, load_api_key
from serve.schemas import TaskRequest

READY_TIMEOUT_S = 2.0
GENERATIVE_KINDS = ("causal_lm", "seq2seq_lm")
VLM_KIND = "vision_causal_lm"


def is_generator(meta: dict[str, Any]) -> bool:
    """Whether a model (its ``describe_model`` entry) generates text through the engine."""
    return meta["kind"] in GENERATIVE_KINDS and meta["task"].get("formulation") != "decoder"


def is_vlm(meta: dict[str, Any]) -> bool:
    """Whether a model is a vision-language model (image + prompt → text)."""
    return meta["kind"] == VLM_KIND


class IngressCore:
    """State and request checks shared by every route family of the ingress.

    ``args`` arrive as a constructor argument (not a closure), so this class is importable and
    pickled by reference: module state it reads (the replica's drain state) is the module's
    own, the one the request guard updates.
    """

    def __init__(
        self,
        args: AppArgs,
        handles: dict[str, DeploymentHandle],
        metas: dict[str, dict[str, Any]],
        retriever: DeploymentHandle | None = None,
        rag: DeploymentHandle | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        from tasks import get_task, task_from_spec

        self.args = args
        self.limits = args.limits
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
            if is_generator(meta)
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
        if is_vlm(self.metas[base]):
            raise HTTPException(
                422,
                f"model '{model}' is multimodal: use /v1/tasks/multimodal, or "
                "/v1/chat/completions with an image_url content part",
            )
        if not is_generator(self.metas[base]):
            raise HTTPException(
                422, f"model '{model}' is a {self.tasks[base].name} head, not a generator"
            )
        adapter = model if model in self.adapters else None
        return base, self.handles[base], adapter

    def _params(self, base: str, given: dict[str, Any]) -> dict[str, Any]:
        defaults = self.specs[base].generation
        params = {k: v for k, v in given.items() if v is not None}
        out = {**defaults.model_dump(), **params}
        if out["max_new_tokens"] > self.limits.max_new_tokens:
            raise HTTPException(
                422,
                f"max_tokens: {out['max_new_tokens']} exceeds limits.max_new_tokens="
                f"{self.limits.max_new_tokens}",
            )
        stop = out.get("stop") or ()
        out["stop"] = tuple([stop] if isinstance(stop, str) else stop)
        if len(out["stop"]) > 4:
            raise HTTPException(422, f"stop: at most 4 sequences, got {len(out['stop'])}")
        return out

    def _openai_params(self, base: str, body: Any) -> dict[str, Any]:
        """Generation parameters of an OpenAI (chat) completion request, checked."""
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

    def _check_prompt(self, base: str, prompt: str, where: str) -> None:
        if len(prompt) > self.limits.max_text_chars * 4:
            raise HTTPException(
                413,
                f"{where}: {len(prompt)} characters exceed the prompt limit "
                f"(4 × limits.max_text_chars={self.limits.max_text_chars})",
            )
        count = len(self.tokenizers[base](prompt, add_special_tokens=False)["input_ids"])
        if count > self.limits.max_input_tokens:
            raise HTTPException(
                413,
                f"{where}: {count} prompt tokens exceed limits.max_input_tokens="
                f"{self.limits.max_input_tokens}",
            )

    def _rows(self, body: TaskRequest, task: Any) -> list[dict[str, Any]]:
        given = [f for f in ("input", "inputs", "text", "texts") if getattr(body, f) is not None]
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
        if len(raw) > self.limits.max_batch_texts:
            raise HTTPException(
                413,
                f"{field}: {len(raw)} items exceed limits.max_batch_texts="
                f"{self.limits.max_batch_texts}",
            )
        from tasks import RowError

        rows = []
        for row, name in zip(raw, names, strict=True):
            for key, value in row.items():
                if isinstance(value, str) and len(value) > self.limits.max_text_chars:
                    where = name if field in ("text", "texts") else f"{name}.{key}"
                    raise HTTPException(
                        413,
                        f"{where}: {len(value)} characters exceed limits.max_text_chars="
                        f"{self.limits.max_text_chars}",
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
        DRAINING.draining = True
        return await self.in_flight()

    async def in_flight(self) -> dict[str, Any]:
        """This replica's id, whether it drains, and its HTTP requests in flight."""
        state = DRAINING
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "draining": state.draining,
            "in_flight": state.in_flight,
        }

    def _need(self, handle: DeploymentHandle | None, what: str) -> DeploymentHandle:
        if handle is None:
            raise HTTPException(
                404, f"{what} is not configured on this server (see retrieval in the config)"
            )
        return handle

    def _text_limit(self, text: str, where: str) -> None:
        if len(text) > self.limits.max_text_chars:
            raise HTTPException(
                413,
                f"{where}: {len(text)} characters exceed limits.max_text_chars="
                f"{self.limits.max_text_chars}",
            )
