"""Multimodal: ``image`` + ``prompt`` → ``answer`` for a vision encoder + projector + causal LM.

This is the text side: the prompt starts with one image placeholder, which encoding expands to
``num_image_tokens`` copies of the image token (one per visual token the vision encoder emits),
so the model can put the projected patch features exactly there. The loss is on the answer only.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.base import IGNORE_INDEX, RowError, Task
from tasks.lm import encode_prompt_completion
from tasks.metrics import squad_scores

IMAGE_TOKEN = "<image>"
DATA_URI = "data:image/"


def decode_image_field(value: str) -> bytes | None:
    """The bytes of a ``data:image/...;base64,`` URI (``None`` for a path)."""
    if not value.startswith(DATA_URI):
        return None
    header, _, payload = value.partition(",")
    if ";base64" not in header or not payload:
        raise ValueError("data URI must be data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("data URI holds invalid base64") from None


class MultimodalRow(BaseModel):
    """An image (path or base64 data URI), a question about it, and the answer."""

    model_config = ConfigDict(strict=True, extra="ignore")

    image: str = Field(min_length=1, description="path, or data:image/png;base64,...")
    prompt: str = Field(min_length=1)
    answer: str | None = None

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        decode_image_field(value)
        return value


class MultimodalOptions(BaseModel):
    """How many visual tokens stand for the image, and which token marks them."""

    model_config = ConfigDict(extra="forbid")

    num_image_tokens: int = Field(default=16, ge=1, le=4096)
    image_token: str = IMAGE_TOKEN


class MultimodalTask(Task):
    """Visual question answering with a LLaVA-style model."""

    name: ClassVar[str] = "multimodal"
    description: ClassVar[str] = "image + question → answer (exact match, F1)"
    formulations: ClassVar[dict[str, str]] = {"vlm": "vision_causal_lm"}
    row_schema: ClassVar[type[MultimodalRow]] = MultimodalRow
    options_schema: ClassVar[type[BaseModel] | None] = MultimodalOptions

    def prompt(self, row: dict[str, Any]) -> str:
        """The text prompt with one image placeholder in front."""
        return f"{self.options.image_token}\nQuestion: {row['prompt']}\nAnswer:"

    def generation_prompt(self, row: dict[str, Any], tokenizer: Any = None) -> str:
        """The text prompt (the model expands the placeholder)."""
        return self.prompt(row)

    def image_token_id(self, tokenizer: Any) -> int:
        """The id of the image placeholder; the tokenizer must know it as one token."""
        token_id = tokenizer.convert_tokens_to_ids(self.options.image_token)
        if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
            raise RowError(
                "tokenizer",
                f"has no '{self.options.image_token}' token; add it as a special token",
            )
        return int(token_id)

    def encode_row(self, row: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
        if "answer" not in row:
            raise RowError("answer", "missing field (needed to train or evaluate)")
        image_id = self.image_token_id(tokenizer)
        budget = self.max_length - (self.options.num_image_tokens - 1)
        if budget < 8:
            raise RowError("prompt", f"max_length={self.max_length} leaves no room for text")
        features = encode_prompt_completion(
            tokenizer, self.prompt(row), " " + row["answer"], budget, "answer"
        )
        ids, labels = features["input_ids"], features["labels"]
        if ids.count(image_id) != 1:
            raise RowError("prompt", "must not contain the image token itself")
        at = ids.index(image_id)
        n = self.options.num_image_tokens
        ids = ids[:at] + [image_id] * n + ids[at + 1 :]
        labels = labels[:at] + [IGNORE_INDEX] * n + labels[at + 1 :]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def decode(self, outputs: Any, rows: Sequence[dict[str, Any]] | None = None) -> list[dict]:
        """Generated texts → ``{"text"}``."""
        return [{"text": str(text).strip()} for text in outputs]

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        """SQuAD-normalised exact match (as accuracy) and F1 of the answers."""
        scores = squad_scores([p["text"] for p in predictions], [[r["answer"]] for r in rows])
        return {"accuracy": scores["exact_match"] / 100.0, "f1": scores["f1"]}
