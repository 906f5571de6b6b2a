"""Request and response bodies of the HTTP API, shared by the ingress and the Python client.

Pure pydantic (no Ray), so ``from serve.client import Client`` works on any machine.
"""

from __future__ import annotations

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
    """A served model as ``/v1/models`` lists it."""

    id: str
    task: str
    labels: list[str] | None = None
    object: str = "model"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: str = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """Every error: one line naming what is wrong."""

    error: dict[str, str]
