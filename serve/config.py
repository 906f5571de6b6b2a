"""Arguments of the taskray Serve application (the ``args`` of ``configs/serve.yaml``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class GenerationDefaults(BaseModel):
    """Generation settings used when a request leaves them out (hot-reloadable)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)


class SchedulerArgs(BaseModel):
    """The continuous-batching engine of a generator replica: a causal LM or a T5- or
    BART-family encoder-decoder (hot: ``user_config``).
    Budgets are reserved whole when a request joins (prompt + its max tokens), so a running
    request is never preempted; past ``max_queued`` waiting requests the server answers 503."""

    model_config = ConfigDict(extra="forbid")

    max_running: int = Field(
        default=32, ge=1, le=4096,
        description="rows decoded together (a sequence each; a beam search holds one per beam)",
    )  # fmt: skip
    max_cached_tokens: int = Field(
        default=32768, ge=16,
        description="KV-cache bound: prompt + max tokens of each running row",
    )  # fmt: skip
    max_queued: int = Field(default=256, ge=0, description="waiting requests before 503s")
    max_prefill_tokens: int = Field(
        default=4096, ge=1, description="prompt tokens prefilled per step (joins that wait)"
    )
    prefix_cache_tokens: int = Field(
        default=4096,
        ge=0,
        description="prompt tokens whose K/V are kept so that later prompts starting the same "
        "way (a system prompt, earlier chat turns) prefill only the rest; causal LMs; 0 = off",
    )
    stream_interval_s: float = Field(
        default=0.05,
        ge=0,
        le=2,
        description="a stream sends its text at most this often (the first piece at once); "
        "text decoded in between goes out joined. 0 = every piece as it is decoded",
    )
    stream_messages_per_s: float = Field(
        default=40,
        ge=0,
        description="text items a second that all of a replica's streams send together: with "
        "more open streams than stream_messages_per_s × stream_interval_s, each stream's "
        "interval widens to open streams / stream_messages_per_s. 0 = no budget",
    )


class ServedModel(BaseModel):
    """One model (a taskray bundle or a plain HF model directory) and what it serves."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="model id (the request's `model`)")
    bundle: str = Field(description="bundle directory, or a plain HF model directory")
    task: str | None = Field(
        default=None,
        description="task family; a bundle's own task when omitted (plain directories: generation)",
    )
    also_serves: list[str] = Field(
        default_factory=list,
        description="more generative task families this generator answers, each prompted with "
        "its family's template (e.g. an instruct model serving summarization and translation)",
    )
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs reserved per replica")
    num_gpus: float = Field(default=0, ge=0, description="GPUs per replica")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters over this base: request `model` name → adapter directory",
    )
    max_adapters: int = Field(default=4, ge=1, description="adapters held per replica (LRU)")
    max_batch_size: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="static batches (heads; generators the engine refuses, e.g. assisted decoding)",
    )
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, le=5)
    scheduler: SchedulerArgs = Field(
        default_factory=SchedulerArgs,
        description="continuous batching of causal-LM and T5-/BART-family generators",
    )
    generation: GenerationDefaults = GenerationDefaults()
    device: str = "auto"

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for name in value:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"adapter name {name!r} must match {NAME_PATTERN}")
        return value


class Limits(BaseModel):
    """Refused before any model sees the request."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_text_chars: int = Field(default=20_000, ge=1)
    max_batch_texts: int = Field(default=256, ge=1)
    max_input_tokens: int = Field(default=4096, ge=1, description="prompt tokens (generators)")
    max_new_tokens: int = Field(default=512, ge=1, description="largest max_tokens accepted")
    max_messages: int = Field(default=256, ge=1, description="chat messages per request")
    max_image_bytes: int = Field(
        default=700_000,
        ge=1024,
        description="encoded image size (as base64 it must also fit max_body_bytes)",
    )
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=64, description="width × height of a decoded image"
    )


class RagArgs(BaseModel):
    """The ``/v1/rag`` pipeline: which served models generate and/or read."""

    model_config = ConfigDict(extra="forbid")

    generator: str | None = Field(default=None, description="a served generator's name")
    reader: str | None = Field(default=None, description="a served extractive_qa head's name")
    vlm: str | None = Field(
        default=None, description="a served multimodal model: answers requests with an image"
    )
    passage_budget: int = Field(default=384, ge=16, description="prompt tokens of passages")
    chat: bool = Field(default=False, description="wrap the RAG prompt in the chat template")
    num_cpus: float = Field(default=0.25, gt=0)


class RetrievalArgs(BaseModel):
    """The retriever deployment (``/v1/retrieve``, ``/v1/embeddings``) and optional RAG."""

    model_config = ConfigDict(extra="forbid")

    qdrant: dict[str, Any] = Field(
        default_factory=dict,
        description="collection, path (local folder) or url (+ api_key_env) of the index",
    )
    embedder: str | None = Field(
        default=None, description="embedding model; None = the model the collection records"
    )
    default_k: int = Field(default=5, ge=1)
    max_k: int = Field(default=50, ge=1)
    num_cpus: float = Field(default=0.5, gt=0)
    rag: RagArgs | None = None


class AppArgs(BaseModel):
    """Everything the application builder needs."""

    model_config = ConfigDict(extra="forbid")

    models: list[ServedModel] = Field(default_factory=list)
    limits: Limits = Limits()
    api_key_env: str | None = Field(
        default="TASKRAY_API_KEY",
        description="environment variable holding the API key; unset or empty = no auth",
    )
    api_key_file: str | None = Field(default=None, description="file holding the API key")
    retrieval: RetrievalArgs | None = Field(default=None, description="retrieval and RAG")

    @model_validator(mode="after")
    def _something_to_serve(self) -> AppArgs:
        if not self.models and self.retrieval is None:
            raise ValueError("models: serve at least one model (or configure retrieval)")
        rag = self.retrieval.rag if self.retrieval else None
        if rag is not None:
            names = {m.name for m in self.models}
            for role in ("generator", "reader", "vlm"):
                name = getattr(rag, role)
                if name is not None and name not in names:
                    raise ValueError(f"retrieval.rag.{role}: no served model named {name!r}")
            if rag.generator is None and rag.reader is None and rag.vlm is None:
                raise ValueError("retrieval.rag: name a generator, a reader and/or a vlm")
        return self

    @field_validator("models")
    @classmethod
    def _unique_names(cls, value: list[ServedModel]) -> list[ServedModel]:
        seen: set[str] = set()
        for model in value:
            for name in [model.name, *model.adapters]:
                if name in seen:
                    raise ValueError(f"model or adapter name {name!r} is used twice")
                seen.add(name)
        return value


def replica_threads(num_cpus: float) -> int:
    """Torch threads of a replica: the cores it reserves (at least one). More threads than
    reserved cores spin-wait on cores that the proxy, the ingress and other replicas need."""
    import os

    return max(1, min(int(num_cpus), os.cpu_count() or 1))


def replica_device(spec: ServedModel) -> str:
    """Prepare a model replica's torch and return its device: the replica's share of threads
    (replicas share the node's cores with each other and with Ray itself), and ``auto`` →
    CUDA when present, else CPU."""
    import torch

    torch.set_num_threads(replica_threads(spec.num_cpus))
    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec.device
