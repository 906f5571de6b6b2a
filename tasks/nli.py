"""NLI: ``premise``, ``hypothesis`` → entailment / neutral / contradiction (encoder pair)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from tasks.base import RowError
from tasks.classification import _FEATURE_KEYS, ClassificationTask
from tasks.lm import Text

NLI_LABELS = ["entailment", "neutral", "contradiction"]


class NLIRow(Text):
    """A premise/hypothesis pair with its relation."""

    premise: str
    hypothesis: str
    label: str | None = Field(default=None, description="entailment, neutral or contradiction")

    @field_validator("label")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.strip().lower() if value is not None else None


class NLITask(ClassificationTask):
    """Sentence-pair classification ``[CLS] premise [SEP] hypothesis [SEP]``."""

    name: ClassVar[str] = "nli"
    description: ClassVar[str] = "premise, hypothesis → entailment/neutral/contradiction"
    formulations: ClassVar[dict[str, str]] = {"encoder": "sequence_classification"}
    row_schema: ClassVar[type[NLIRow]] = NLIRow

    def __init__(self, formulation: str | None = None, max_length: int = 512, labels=None, **kw):
        super().__init__(formulation, max_length, labels or NLI_LABELS, **kw)

    def check(self, row: dict[str, Any]) -> None:
        if row.get("label") is not None and row["label"] not in (self.labels or NLI_LABELS):
            raise RowError(
                "label",
                f"unknown label {row['label']!r} (known: {', '.join(self.labels or NLI_LABELS)})",
            )

    def encode_row(self, row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
        # "longest_first" trims the longer of the two texts first, token by token.
        enc = tokenizer(
            row["premise"],
            row["hypothesis"],
            truncation="longest_first",
            max_length=self.max_length,
        )
        features = {k: list(v) for k, v in enc.items() if k in _FEATURE_KEYS}
        if "label" in row:
            features["labels"] = self.label2id[row["label"]]
        return features
