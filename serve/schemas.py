"""Request and response bodies of the HTTP API, shared by the ingress and the Python client.

Pure pydantic (no Ray), so ``from serve.client import Client`` works on any machine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr


class ClassifyRequest(BaseModel):
    """``POST /v1/tasks/classification``: one ``text`` or a list of ``texts``."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr | None = Field(default=None, description="one text to classify")
    texts: list[StrictStr] | None = Field(default=None, description="several texts")
    model: StrictStr | None = Field(default=None, description="which served model (optional)")
    return_all_scores: StrictBool = Field(default=False, description="include every class")


class ClassLabel(BaseModel):
    """One prediction: the best label, its probability, and optionally every class's."""

    label: str
    score: float
    scores: dict[str, float] | None = None


class ClassifyResponse(BaseModel):
    """Predictions in request order (one for ``text``, one per item of ``texts``)."""

    model: str
    predictions: list[ClassLabel]


class ModelCard(BaseModel):
    """A served model or adapter as ``/v1/models`` lists it (OpenAI's model object + task)."""

    id: str
    task: str
    labels: list[str] | None = None
    object: str = "model"
    created: int = 0
    owned_by: str = "taskray"
    parent: str | None = Field(default=None, description="the base model of an adapter")
    also: list[str] | None = Field(default=None, description="more task families it serves")


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: str = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """Every error: one line naming what is wrong."""

    error: dict[str, str]


MAX_SEED = 2**32 - 1
#: A stop sequence: non-empty (an empty one would stop everything) and short.
StopString = Annotated[str, Field(strict=True, min_length=1, max_length=64)]


# ----- task routes --------------------------------------------------------------------------
class GenerationParameters(BaseModel):
    """Sampling settings of generative task routes (defaults from the serve config)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop: list[StopString] | None = Field(default=None, max_length=4)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


class TaskRequest(BaseModel):
    """``POST /v1/tasks/{task}``: one row (``input``) or several (``inputs``) in the task's row
    schema (``taskray tasks`` lists them); ``text``/``texts`` are shorthand for ``{"text": …}``
    rows."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any] | None = Field(default=None, description="one row")
    inputs: list[dict[str, Any]] | None = Field(default=None, description="several rows")
    text: StrictStr | None = Field(default=None, description="shorthand for input={'text': …}")
    texts: list[StrictStr] | None = Field(default=None, description="several texts")
    model: StrictStr | None = Field(default=None, description="which served model (optional)")
    return_all_scores: StrictBool = Field(default=False, description="classification heads")
    parameters: GenerationParameters | None = Field(default=None, description="generative tasks")


class TaskResponse(BaseModel):
    """Predictions in request order, each in the task family's output shape."""

    model: str
    task: str
    predictions: list[dict[str, Any]]


# ----- OpenAI-compatible ----------------------------------------------------------------------
class _Sampling(BaseModel):
    # OpenAI clients send fields taskray does not use (user, logprobs…): ignore, don't refuse.
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop: StopString | list[StopString] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: StrictBool = False
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: (
        Annotated[str, Field(strict=True, min_length=1)]
        | list[Annotated[str, Field(strict=True, min_length=1)]]
    )


class ContentPart(BaseModel):
    """A part of a chat message's content (text parts only for text models)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: StrictStr | None = None
    image_url: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    """One chat message, in OpenAI's form: an assistant message may carry ``tool_calls`` (then
    its content may be null) and ``reasoning_content``; a ``tool`` message is a tool's result.
    They reach the model's chat template as the dialogue task renders them in training."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = Field(default=None, max_length=64)
    tool_call_id: StrictStr | None = None
    name: StrictStr | None = None
    reasoning_content: StrictStr | None = None


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=128,
        description="tool (function) definitions, passed to the model's chat template",
    )


class MultimodalRequest(BaseModel):
    """``POST /v1/tasks/multimodal`` as JSON (a multipart upload has the same fields, with
    ``image`` as the file)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    image: StrictStr = Field(
        min_length=1, description="data:image/png;base64,... or plain base64 of the file"
    )
    prompt: StrictStr = Field(min_length=1)
    parameters: GenerationParameters | None = None


# ----- retrieval and RAG --------------------------------------------------------------------
class RetrieveRequest(BaseModel):
    """``POST /v1/retrieve``: top-``k`` passages for ``query`` (optional payload filters)."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr = Field(min_length=1)
    k: int | None = Field(default=None, ge=1)
    filters: dict[str, Any] | None = Field(default=None, description="payload field → value")


class RetrieveResponse(BaseModel):
    """Passages, best first, each with its score, document id and character span."""

    passages: list[dict[str, Any]]


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings`` (OpenAI-compatible)."""

    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"


class RagRequest(BaseModel):
    """``POST /v1/rag``: a question answered from the index, with cited sources."""

    model_config = ConfigDict(extra="forbid")

    question: StrictStr = Field(min_length=1)
    k: int | None = Field(default=None, ge=1)
    filters: dict[str, Any] | None = None
    mode: Literal["generate", "extractive"] = "generate"
    stream: StrictBool = False
    parameters: GenerationParameters | None = None
    image: StrictStr | None = Field(
        default=None,
        min_length=1,
        description="an image (data:image/...;base64,... or plain base64): the passages and "
        "the question go to the retrieval config's vlm with it",
    )
