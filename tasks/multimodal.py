"""Multimodal: ``image`` + ``prompt`` → ``answer`` for a vision encoder + projector + causal LM.

This is the text side: the prompt starts with one image placeholder, which encoding expands to
``num_image_tokens`` copies of the image token (one per visual token the vision encoder emits),
so the model can put the projected patch features exactly there. The loss is on the answer only.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.base import IGNORE_INDEX, RowError, Task
from tasks.lm import bos_prefix, encode_prompt_completion
from tasks.metrics import squad_scores

IMAGE_TOKEN = "<image>"
DATA_URI = "data:image/"
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
"""Formats accepted from users (PIL can open more; these are the ones images come in)."""
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096


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


def load_image(
    data: bytes,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    what: str = "image",
) -> Any:
    """Decode image bytes into an RGB ``PIL.Image``, or raise a ``RowError`` naming the problem.

    Checks size, format and pixel count from the header before decoding the pixels, so an
    oversized upload or a decompression bomb is refused without being expanded in memory.
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise RowError(what, f"is {len(data):,} bytes, over the limit of {max_bytes:,} bytes")
    if not data:
        raise RowError(what, "is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RowError(
            what, f"is not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
        ) from None
    except (OSError, ValueError) as err:
        raise RowError(what, f"cannot be read ({err})") from None
    if image.format not in IMAGE_FORMATS:
        raise RowError(
            what, f"format {image.format} is not supported (use {', '.join(IMAGE_FORMATS)})"
        )
    width, height = image.size
    if width * height > max_pixels:
        raise RowError(what, f"is {width}x{height} pixels, over the limit of {max_pixels:,} pixels")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        # SyntaxError is how PIL reports some broken headers (e.g. a truncated PNG chunk).
        raise RowError(what, f"is corrupt or truncated ({err})") from None
    return image.convert("RGB")


def read_image_field(value: str, base_dir: str | Path | None = None, **limits: int) -> Any:
    """The RGB image a row's ``image`` field names: a data URI, or a path (relative paths are
    relative to ``base_dir``, the data file's folder)."""
    try:
        inline = decode_image_field(value)
    except ValueError as err:
        raise RowError("image", str(err)) from None
    if inline is not None:
        return load_image(inline, **limits)
    path = Path(value)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RowError("image", f"file not found: {path}") from None
    except OSError as err:
        raise RowError("image", f"cannot read {path}: {err.strerror}") from None
    return load_image(data, **limits)


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

    def _expand(self, ids: list[int], image_id: int) -> tuple[list[int], int]:
        """Replace the one placeholder with ``num_image_tokens`` copies; return ids and where."""
        count = ids.count(image_id)
        if count == 0:
            raise RowError(
                "prompt", f"is too long: the image placeholder was cut off at {self.max_length}"
            )
        if count > 1:
            raise RowError("prompt", f"must not contain the image token {self.options.image_token}")
        at = ids.index(image_id)
        return ids[:at] + [image_id] * self.options.num_image_tokens + ids[at + 1 :], at

    def _text_budget(self) -> int:
        budget = self.max_length - (self.options.num_image_tokens - 1)
        if budget < 8:
            raise RowError("prompt", f"max_length={self.max_length} leaves no room for text")
        return budget

    def encode_prompt(self, row: dict[str, Any], tokenizer: Any) -> list[int]:
        """The prompt's ids with the placeholder expanded: what inference feeds the model.

        Training (``encode_row``) builds its prompt with the same expansion, so a served model
        sees exactly the token layout it was trained on.
        """
        image_id = self.image_token_id(tokenizer)
        budget = self._text_budget()
        ids = bos_prefix(tokenizer) + list(
            tokenizer(self.prompt(row), add_special_tokens=False)["input_ids"]
        )
        if len(ids) > budget and image_id in ids:
            # Too long: keep the placeholder and the end of the text (the question, next to
            # where the answer starts); drop text from just after the image.
            at = ids.index(image_id)
            head, tail = ids[: at + 1], ids[at + 1 :]
            keep = max(budget - len(head), 0)
            ids = head + (tail[len(tail) - keep :] if keep else [])
        return self._expand(ids, image_id)[0]

    def encode_row(self, row: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
        if "answer" not in row:
            raise RowError("answer", "missing field (needed to train or evaluate)")
        image_id = self.image_token_id(tokenizer)
        features = encode_prompt_completion(
            tokenizer, self.prompt(row), " " + row["answer"], self._text_budget(), "answer"
        )
        ids, at = self._expand(features["input_ids"], image_id)
        labels = features["labels"]
        labels = labels[:at] + [IGNORE_INDEX] * self.options.num_image_tokens + labels[at + 1 :]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def decode(self, outputs: Any, rows: Sequence[dict[str, Any]] | None = None) -> list[dict]:
        """Generated texts → ``{"text"}``."""
        return [{"text": str(text).strip()} for text in outputs]

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        """SQuAD-normalised exact match (as accuracy) and F1 of the answers."""
        scores = squad_scores([p["text"] for p in predictions], [[r["answer"]] for r in rows])
        return {"accuracy": scores["exact_match"], "f1": scores["f1"]}
