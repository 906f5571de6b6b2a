"""The taskray Ray Serve application: task heads and generators composed behind one FastAPI
ingress.

``build_app`` is an application builder: Serve config files name it as
``import_path: serve.app:build_app`` with the ``AppArgs`` as ``args``, so ``serve run`` /
``serve deploy`` / ``taskray serve`` / a KubeRay RayService all deploy the same thing.

Routes: ``/v1/tasks/{task}`` for every family (``/v1/tasks/multimodal`` takes an image as JSON
base64 or a multipart upload), OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions``
(both streaming as server-sent events; image content parts for multimodal models) and
``/v1/models``, retrieval and RAG (with an optional image), plus ``/healthz`` and ``/readyz``.
Every limit is checked in the ingress, before a model sees the request.

Where things live: the request guard and error shape in ``serve/guard.py``; what every route
shares in ``serve/ingress.py``; one module per route family in ``serve/routes/``; the task-head
deployment in ``serve/heads.py``, the generator in ``serve/generator.py``; this module wires
the deployments together.
"""

import json
from pathlib import Path
from typing import Any

from ray import serve

from serve.config import AppArgs, ServedModel
from serve.generator import generator_class
from serve.guard import make_api
from serve.heads import TaskHead
from serve.ingress import GENERATIVE_KINDS, is_generator, is_vlm
from serve.routes.multimodal import multimodal_routes
from serve.routes.openai import openai_routes
from serve.routes.retrieval import retrieval_routes
from serve.routes.service import service_routes
from serve.routes.tasks import task_routes

__all__ = ["TaskHead", "build_app", "build_ingress", "describe_model"]


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


def build_ingress(args: AppArgs) -> Any:
    """The ingress deployment class for these args: one Serve deployment whose routes come
    from every route family's mixin, registered on one FastAPI app with the request guard."""
    api = make_api(args)
    # Registration order is matching order: /v1/tasks/multimodal before /v1/tasks/{task}.
    mixins = [
        service_routes(api),
        multimodal_routes(api),
        task_routes(api),
        openai_routes(api),
        retrieval_routes(api),
    ]

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512)
    @serve.ingress(api)
    class Ingress(*mixins):  # type: ignore[misc]
        """HTTP front door: validates, authenticates, and fans out to the model deployments.
        Built with ``(args, handles, metas, retriever, rag)``, see :class:`IngressCore`."""

    return Ingress


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
        if is_vlm(meta):
            if spec.also_serves or spec.adapters:
                raise ValueError(
                    f"model '{spec.name}': also_serves and adapters apply to text generators only"
                )
            from serve.vlm import VisionLanguage

            lim = parsed.limits
            handles[spec.name] = VisionLanguage.options(
                name=f"vlm-{spec.name}", ray_actor_options=resources
            ).bind(spec.model_dump(), lim.max_image_bytes, lim.max_image_pixels)
        elif is_generator(meta):
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
                    if not is_vlm(metas[name]):
                        raise ValueError(f"retrieval.rag.vlm: '{name}' is not multimodal")
                    continue
                kind_ok = is_generator(metas[name]) == (role == "generator")
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
    return (
        build_ingress(parsed).options(name="Ingress").bind(parsed, handles, metas, retriever, rag)
    )
