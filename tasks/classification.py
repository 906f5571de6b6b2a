"""Text classification: ``text`` → one label of a closed set.

Formulation ``encoder``: an encoder with a sequence-classification head over [CLS]; the loss is
cross-entropy on the class id. Formulation ``decoder``: a causal LM reads a prompt
(``Text: … Label:``) and the loss falls only on the label's tokens (+ EOS); to predict, each
label's token sequence is scored and the scores are normalised over the label set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.base import RowError, Task
from tasks.lm import bos_prefix, encode_prompt_completion, eos_token_id


class ClassificationOptions(BaseModel):
    """Options of the decoder formulation."""

    model_config = ConfigDict(extra="forbid")

    prompt_template: str = Field(
        default="Text: {text}\nLabel:", description="decoder prompt; the label follows it"
    )


class ClassificationRow(BaseModel):
    """A labelled text. ``label`` may be a name or an integer id-like value."""

    model_config = ConfigDict(strict=True, extra="ignore")

    text: str = Field(description="the text to classify")
    label: Any = Field(default=None, description="gold label name or integer id (training data)")

    @field_validator("text")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("label", mode="before")
    @classmethod
    def _label_str(cls, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"must be a string or an integer, not a {type(value).__name__}")
        value = str(value).strip()
        if not value:
            raise ValueError("must be a non-empty label name")
        return value


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class ClassificationTask(Task):
    """Sequence classification with an encoder and a [CLS] head."""

    name: ClassVar[str] = "classification"
    description: ClassVar[str] = "text → one label of a closed set (accuracy, macro-F1)"
    formulations: ClassVar[dict[str, str]] = {
        "encoder": "sequence_classification",
        "decoder": "causal_lm",
    }
    row_schema: ClassVar[type[ClassificationRow]] = ClassificationRow
    uses_label_set: ClassVar[bool] = True
    options_schema: ClassVar[type[BaseModel] | None] = ClassificationOptions

    text_field: ClassVar[str] = "text"

    def label_values(self, row: dict[str, Any]) -> list[str]:
        return [row["label"]] if "label" in row else []

    def check(self, row: dict[str, Any]) -> None:
        label = row.get("label")
        if label is not None and self.labels is not None and label not in self.labels:
            known = ", ".join(self.labels)
            raise RowError("label", f"unknown label {label!r} (known: {known})")

    def prompt(self, row: dict[str, Any]) -> str:
        """The decoder formulation's prompt for a row."""
        return self.options.prompt_template.format(**row)

    def label_continuation(self, label: str, tokenizer: Any) -> list[int]:
        """The supervised tokens of a label in the decoder formulation (label + EOS)."""
        ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        return [*ids, eos_token_id(tokenizer)]

    def scoring_inputs(self, row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
        """For the decoder formulation: the prompt ids and each label's continuation ids; the
        model layer sums each continuation's token log-probs and passes them to ``decode``."""
        prompt_ids = bos_prefix(tokenizer) + list(
            tokenizer(self.prompt(row), add_special_tokens=False)["input_ids"]
        )
        longest = max(len(self.label_continuation(lb, tokenizer)) for lb in self.labels or [])
        return {
            "prompt_ids": prompt_ids[max(0, len(prompt_ids) - (self.max_length - longest)) :],
            "continuations": [self.label_continuation(lb, tokenizer) for lb in self.labels or []],
        }

    def encode_row(self, row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
        if self.model_kind == "causal_lm":
            if "label" not in row:
                raise RowError("label", "missing field (needed to train or evaluate)")
            return encode_prompt_completion(
                tokenizer, self.prompt(row), " " + row["label"], self.max_length, "label"
            )
        enc = tokenizer(row[self.text_field], truncation=True, max_length=self.max_length)
        features = {k: list(v) for k, v in enc.items() if k in _FEATURE_KEYS}
        if "label" in row:
            features["labels"] = self.label2id[row["label"]]
        return features

    def decode(
        self,
        outputs: Any,
        rows: Sequence[dict[str, Any]] | None = None,
        all_scores: bool = False,
    ) -> list[dict[str, Any]]:
        """Scores ``[batch, num_labels]`` → ``{"label", "score"}`` (+ ``scores`` on request).

        For the encoder these are the head's logits; for the decoder, each label's summed token
        log-probability. Either way a softmax over the label set gives the normalised score.
        """
        if self.labels is None:
            raise RuntimeError("classification task has no label set")
        probs = softmax(np.asarray(outputs, dtype=np.float64))
        out = []
        for row_probs in probs:
            best = int(row_probs.argmax())
            pred: dict[str, Any] = {"label": self.labels[best], "score": float(row_probs[best])}
            if all_scores:
                pred["scores"] = {
                    label: float(p) for label, p in zip(self.labels, row_probs, strict=True)
                }
            out.append(pred)
        return out

    def metrics(
        self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
    ) -> dict[str, float]:
        """Accuracy and macro-F1 over the label set (scikit-learn's definitions)."""
        from sklearn.metrics import accuracy_score, f1_score

        if len(predictions) != len(rows):
            raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
        if not rows:
            return {"accuracy": 0.0, "macro_f1": 0.0, "count": 0.0}
        gold = [row["label"] for row in rows]
        pred = [p["label"] for p in predictions]
        return {
            "accuracy": float(accuracy_score(gold, pred)),
            "macro_f1": float(
                f1_score(gold, pred, labels=self.labels, average="macro", zero_division=0)
            ),
            "count": float(len(rows)),
        }


_FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids")
