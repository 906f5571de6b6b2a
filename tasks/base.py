"""The task contract that every task family implements.

A task knows four things about its family and nothing about Ray or model weights:

* the row schema (``validate``): what a valid input row looks like, with a reason naming the
  field when it is not;
* the encoding (``encode_batch``): from validated rows to model features, including the labels
  and loss mask for the chosen formulation;
* the decoding (``decode``): from model outputs to what a user sees;
* the metrics (``metrics``): the field's standard numbers for predictions against gold rows.

Tokenizers are passed in (any ``transformers`` tokenizer), so this package stays pure Python.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

IGNORE_INDEX = -100
"""Label value that the loss ignores (the convention of PyTorch's cross-entropy and HF)."""


class TaskError(ValueError):
    """A configuration of a task that cannot work (unknown formulation, bad label set...)."""


class RowError(ValueError):
    """A row that does not fit its task; ``field`` names the culprit, ``reason`` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _pydantic_reason(err: ValidationError) -> RowError:
    """Turn pydantic's first error into a one-line RowError naming the field."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or "row"
    kind = first.get("type", "")
    if kind == "missing":
        return RowError(field, "missing field")
    value = first.get("input")
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return RowError(field, f"{first.get('msg', 'invalid')} (got {type(value).__name__} {shown})")


class Task(ABC):
    """Base class of every task family.

    Subclasses set the class attributes and implement ``encode_row`` (or ``encode_batch``),
    ``decode`` and ``metrics``. ``formulations`` maps each supported formulation to the model
    kind that trains it; the first entry is the default.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    formulations: ClassVar[dict[str, str]]
    row_schema: ClassVar[type[BaseModel]]
    uses_label_set: ClassVar[bool] = False
    """Whether the task has a closed label set (taken from config or inferred from data)."""
    options_schema: ClassVar[type[BaseModel] | None] = None
    """Family-specific options (e.g. ``doc_stride``); unknown options are errors."""

    def __init__(
        self,
        formulation: str | None = None,
        max_length: int = 512,
        labels: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        if formulation is None:
            formulation = next(iter(self.formulations))
        if formulation not in self.formulations:
            known = ", ".join(self.formulations)
            raise TaskError(
                f"task '{self.name}' has no formulation '{formulation}' (choose one of: {known})"
            )
        if max_length < 8:
            raise TaskError(f"max_length must be at least 8, got {max_length}")
        self.formulation = formulation
        self.max_length = max_length
        self.options = self._parse_options(options)
        self.labels: list[str] | None = None
        if labels is not None:
            self.set_labels(labels)

    def _parse_options(self, options: dict[str, Any]) -> Any:
        if self.options_schema is None:
            if options:
                raise TaskError(
                    f"task '{self.name}' takes no options, got: {', '.join(sorted(options))}"
                )
            return None
        try:
            return self.options_schema.model_validate(options)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ())) or "options"
            raise TaskError(f"task '{self.name}' option {loc}: {first.get('msg')}") from None

    # ----- identity -------------------------------------------------------------------------
    @property
    def model_kind(self) -> str:
        """The kind of model this formulation trains (e.g. ``sequence_classification``)."""
        return self.formulations[self.formulation]

    def spec(self) -> dict[str, Any]:
        """A JSON-able description from which ``tasks.get_task`` rebuilds this task."""
        spec: dict[str, Any] = {
            "name": self.name,
            "formulation": self.formulation,
            "max_length": self.max_length,
            "labels": self.labels,
        }
        if self.options is not None:
            spec["options"] = self.options.model_dump()
        return spec

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What ``taskray tasks`` prints: formulations and the row schema's fields."""
        fields = {}
        for fname, info in cls.row_schema.model_fields.items():
            ann = info.annotation
            type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
            type_name = re.sub(r"\b(?:tasks\.\w+\.)", "", type_name)
            fields[fname] = {"type": type_name, "required": info.is_required()}
        return {
            "name": cls.name,
            "description": cls.description,
            "formulations": dict(cls.formulations),
            "row_schema": fields,
        }

    # ----- labels ---------------------------------------------------------------------------
    def set_labels(self, labels: Iterable[str]) -> None:
        """Fix the label set; order is as given (configs) and becomes the class ids."""
        labels = [str(label) for label in labels]
        if len(set(labels)) != len(labels):
            raise TaskError(f"label names must be unique, got {labels}")
        if self.uses_label_set and len(labels) < 2:
            raise TaskError(f"task '{self.name}' needs at least 2 labels, got {labels}")
        self.labels = labels

    @staticmethod
    def sort_labels(values: Iterable[str]) -> list[str]:
        """The stable order for inferred labels: numeric when all look like ints, else text."""
        values = set(values)
        if values and all(v.lstrip("-").isdigit() for v in values):
            return sorted(values, key=int)
        return sorted(values)

    def label_values(self, row: Mapping[str, Any]) -> list[str]:
        """The label names a validated row uses (for inferring the label set)."""
        return []

    @property
    def label2id(self) -> dict[str, int]:
        """Label name → class id (requires the label set)."""
        if self.labels is None:
            raise TaskError(f"task '{self.name}' has no label set yet")
        return {label: i for i, label in enumerate(self.labels)}

    # ----- rows -----------------------------------------------------------------------------
    def validate(self, row: Any) -> dict[str, Any]:
        """Check one input row; return its normalised form or raise ``RowError``."""
        if not isinstance(row, Mapping):
            raise RowError("row", f"expected a JSON object, got {type(row).__name__}")
        try:
            parsed = self.row_schema.model_validate(dict(row))
        except ValidationError as err:
            raise _pydantic_reason(err) from None
        clean = parsed.model_dump(exclude_none=True)
        self.check(clean)
        return clean

    def check(self, row: dict[str, Any]) -> None:
        """Semantic checks beyond the schema (e.g. a known label); raise ``RowError``."""
        return None

    # ----- encoding -------------------------------------------------------------------------
    def encode_row(self, row: dict[str, Any], tokenizer: Any) -> dict[str, Any] | list[dict]:
        """Model features of one validated row; raise ``RowError`` when it cannot be encoded.

        Most families return one feature dict; families that split a row (extractive QA's
        doc-stride windows) return a list of them.
        """
        raise NotImplementedError

    def encode_batch(self, rows: Sequence[dict[str, Any]], tokenizer: Any) -> list[Any]:
        """Features for each row, or the ``RowError`` that row raised (kept in place)."""
        out: list[Any] = []
        for row in rows:
            try:
                out.append(self.encode_row(row, tokenizer))
            except RowError as err:
                out.append(err)
        return out

    def generation_prompt(self, row: dict[str, Any], tokenizer: Any = None) -> str:
        """The text a generative model is given for ``row`` (generative families only)."""
        raise NotImplementedError(f"task '{self.name}' is not generative")

    # ----- decoding and metrics -------------------------------------------------------------
    @abstractmethod
    def decode(self, outputs: Any, rows: Sequence[dict[str, Any]] | None = None) -> list[dict]:
        """Model outputs for a batch → what a user sees, one dict per row."""

    @abstractmethod
    def metrics(
        self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
    ) -> dict[str, float]:
        """The family's standard metrics of decoded predictions against validated gold rows."""
