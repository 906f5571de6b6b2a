"""Shared encodings for language-model formulations (not a family of its own).

``encode_prompt_completion`` is the one place where a causal LM's loss mask is made: the prompt
and the target are tokenised as separate segments and concatenated, so the boundary comes from
the data's structure (never from searching token ids), and decoding the supervised ids gives
back exactly the target's tokens plus EOS. ``TextToTextTask`` is the base of every family whose
row is "some text in → some text out" (generation, code, reasoning, QA, summarisation...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.base import IGNORE_INDEX, RowError, Task


def eos_token_id(tokenizer: Any) -> int:
    """The id that ends a target: EOS, else SEP (BERT-style vocabularies)."""
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise RowError("tokenizer", "has neither an EOS nor a SEP token to end targets with")


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[BOS]`` for tokenizers that prepend it (Llama-style), else nothing.

    Asked of the tokenizer's behaviour, not only its ``add_bos_token`` flag: Llama 3 style
    tokenizers add BOS through their post-processor with the flag unset.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    if getattr(tokenizer, "add_bos_token", False):
        return [int(bos)]
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # a tokenizer that cannot say is taken not to add BOS
        return []
    return [int(bos)] if ids and ids[0] == bos else []


def with_bos_text(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as a server should be given it: with the BOS token's text in front when
    training puts ``[BOS]`` there. Servers tokenise prompts with ``add_special_tokens=False``
    (chat templates carry their own BOS), and the BOS text becomes that one id again."""
    if tokenizer is None or not bos_prefix(tokenizer):
        return prompt
    bos = tokenizer.bos_token
    return prompt if prompt.startswith(bos) else bos + prompt


def encode_prompt_completion(
    tokenizer: Any,
    prompt: str,
    completion: str,
    max_length: int,
    target_field: str = "completion",
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Causal-LM features: loss only on the completion's tokens (and EOS).

    Over ``max_length``, the prompt loses tokens from its start (the end, next to the answer,
    matters most) down to half the budget, then the completion loses tokens from its end. A row
    left with no supervised token is a ``RowError``, never a silent zero-loss row.
    """
    prompt_ids = bos_prefix(tokenizer) + list(
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )
    target_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if add_eos:
        target_ids.append(eos_token_id(tokenizer))
    if not target_ids:
        raise RowError(target_field, "is empty after tokenisation")
    overflow = len(prompt_ids) + len(target_ids) - max_length
    if overflow > 0:
        keep_prompt = max(len(prompt_ids) - overflow, min(len(prompt_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        target_ids = target_ids[: max_length - len(prompt_ids)]
    if not target_ids:
        raise RowError(
            target_field, f"no target tokens left after truncation to max_length={max_length}"
        )
    return {
        "input_ids": prompt_ids + target_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(target_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def encode_seq2seq(
    tokenizer: Any, source: str, target: str, max_length: int, target_field: str
) -> dict[str, list[int]]:
    """Encoder-decoder features: the source as input, the target as ``labels`` (HF shifts them
    into decoder inputs); the tokenizer appends its own end-of-sequence to the target."""
    enc = tokenizer(source, truncation=True, max_length=max_length)
    labels = list(
        tokenizer(text_target=target, truncation=True, max_length=max_length)["input_ids"]
    )
    if not labels:
        raise RowError(target_field, "is empty after tokenisation")
    features = {k: list(v) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    features["labels"] = labels
    return features


class Text(BaseModel):
    """Base of text row schemas: strict types, unknown keys ignored, no blank strings."""

    model_config = ConfigDict(strict=True, extra="ignore", str_min_length=1)

    @field_validator("*")
    @classmethod
    def _not_blank(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be blank")
        return value


class TemplateOptions(BaseModel):
    """Prompt templates (Python format strings over the row's fields)."""

    model_config = ConfigDict(extra="forbid")

    prompt_template: str | None = Field(
        default=None, description="causal prompt, e.g. 'Q: {question}\\nA:' (family default)"
    )
    source_template: str | None = Field(
        default=None, description="encoder-decoder input (family default)"
    )


class TextToTextTask(Task):
    """A family whose rows map to (prompt, target) for causal LMs, (source, target) for
    encoder-decoders. Subclasses define the templates, the target and the metrics."""

    formulations: ClassVar[dict[str, str]] = {"causal": "causal_lm", "seq2seq": "seq2seq_lm"}
    options_schema: ClassVar[type[BaseModel] | None] = TemplateOptions
    target_field: ClassVar[str]
    space_before_target: ClassVar[bool] = False
    """Causal prompts ending in "Summary:"/"Answer:" continue with a space: the target carries
    it, so the trained tokens are the ones a tokenizer makes for " word" after the prompt."""
    prompt_template: ClassVar[str]
    source_template: ClassVar[str]

    def _fill(self, template: str, row: dict[str, Any]) -> str:
        try:
            return template.format(**row)
        except KeyError as err:
            raise RowError(str(err.args[0]), "is used by the prompt template but missing") from None

    def prompt(self, row: dict[str, Any]) -> str:
        """The causal prompt (everything before the target)."""
        template = getattr(self.options, "prompt_template", None) or self.prompt_template
        return self._fill(template, row)

    def source(self, row: dict[str, Any]) -> str:
        """The encoder-decoder input."""
        template = getattr(self.options, "source_template", None) or self.source_template
        return self._fill(template, row)

    def target(self, row: dict[str, Any]) -> str:
        """The supervised text (training rows must have it)."""
        if self.target_field not in row:
            raise RowError(self.target_field, "missing field (needed to train or evaluate)")
        text = row[self.target_field]
        if self.space_before_target and self.model_kind == "causal_lm":
            return " " + text
        return text

    def encode_row(self, row: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
        if self.model_kind == "seq2seq_lm":
            return encode_seq2seq(
                tokenizer, self.source(row), self.target(row), self.max_length, self.target_field
            )
        return encode_prompt_completion(
            tokenizer, self.prompt(row), self.target(row), self.max_length, self.target_field
        )

    def generation_prompt(self, row: dict[str, Any], tokenizer: Any = None) -> str:
        """What a model is given at inference (prompt or source, by formulation); a causal
        prompt starts with the BOS text when training puts ``[BOS]`` in front of it."""
        if self.model_kind == "seq2seq_lm":
            return self.source(row)
        return with_bos_text(tokenizer, self.prompt(row))

    def decode(self, outputs: Any, rows: Sequence[dict[str, Any]] | None = None) -> list[dict]:
        """Generated texts (new tokens only, detokenised) → ``{"text"}``."""
        return [{"text": str(text).strip()} for text in outputs]
