"""Dialogue: multi-turn ``messages`` → the assistant's turns, with the tokenizer's chat template.

The loss mask comes from rendering the template on message prefixes: for assistant message i,
``render(messages[:i], add_generation_prompt=True)`` ends where its content starts and
``render(messages[:i + 1])`` ends after its end-of-turn token. The rendered text is cut at those
boundaries and each piece is tokenised on its own, so every supervised token belongs to an
assistant turn by construction — no searching for template marker strings in token ids.
ShareGPT (``conversations``) and Alpaca (``instruction``/``input``/``output``) rows are
converted to messages on read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.base import IGNORE_INDEX, RowError, Task, TaskError
from tasks.metrics import rouge_scores

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant"}  # fmt: skip


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class DialogueRow(BaseModel):
    """A conversation in OpenAI form (converted from ShareGPT or Alpaca when given those)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    messages: list[Message] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _convert(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "messages" in data:
            return data
        if "conversations" in data:
            turns = data["conversations"]
            if not isinstance(turns, list):
                raise ValueError("conversations must be a list of {from, value} objects")
            messages = []
            for i, turn in enumerate(turns):
                if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                    raise ValueError(f"conversations[{i}] needs 'from' and 'value'")
                role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
                if role is None:
                    raise ValueError(
                        f"conversations[{i}].from {turn['from']!r} is not a known role"
                    )
                messages.append({"role": role, "content": turn["value"]})
            return {"messages": messages}
        if "instruction" in data:
            instruction, extra = data["instruction"], data.get("input") or ""
            if not isinstance(instruction, str) or not isinstance(extra, str):
                raise ValueError("instruction and input must be strings")
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            messages = [{"role": "user", "content": user}]
            if "output" in data:
                messages.append({"role": "assistant", "content": data["output"]})
            if data.get("system"):
                messages.insert(0, {"role": "system", "content": data["system"]})
            return {"messages": messages}
        return data

    @field_validator("messages")
    @classmethod
    def _structure(cls, messages: list[Message]) -> list[Message]:
        body = messages[1:] if messages[0].role == "system" else messages
        if not body:
            raise ValueError("needs at least one user message after the system message")
        for i, message in enumerate(body):
            expected = "user" if i % 2 == 0 else "assistant"
            if message.role != expected:
                offset = i + (len(messages) - len(body))
                raise ValueError(f"message {offset} is '{message.role}', expected '{expected}'")
            if not message.content.strip():
                raise ValueError(f"message {i + len(messages) - len(body)} has empty content")
        return messages


class DialogueOptions(BaseModel):
    """Which assistant turns are trained on."""

    model_config = ConfigDict(extra="forbid")

    train_on: Literal["all", "last"] = Field(
        default="all", description="supervise every assistant turn, or only the last one"
    )


class DialogueTask(Task):
    """Chat fine-tuning: loss on assistant content and its end-of-turn token only."""

    name: ClassVar[str] = "dialogue"
    description: ClassVar[str] = "multi-turn messages → assistant turns (ROUGE-L)"
    formulations: ClassVar[dict[str, str]] = {"chat": "causal_lm"}
    row_schema: ClassVar[type[DialogueRow]] = DialogueRow
    options_schema: ClassVar[type[BaseModel] | None] = DialogueOptions

    def segments(self, messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, supervised) pieces at turn boundaries."""
        if not getattr(tokenizer, "chat_template", None):
            raise TaskError(
                "the tokenizer has no chat template; use a chat model's tokenizer "
                "(model.tokenizer) for the dialogue task"
            )
        assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant_at:
            raise RowError("messages", "has no assistant message to learn from")
        supervised = set(assistant_at if self.options.train_on == "all" else assistant_at[-1:])
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i in assistant_at:
            prefix = tokenizer.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise RowError(
                    "messages",
                    "the chat template does not render message prefixes as prefixes of each "
                    "other, so assistant turns cannot be located",
                )
            pieces.append((prefix[len(done) :], False))
            turn = full[len(prefix) :]
            body = turn.rstrip()  # whitespace after the end-of-turn token is not the answer
            pieces.append((body, i in supervised))
            if len(body) < len(turn):
                pieces.append((turn[len(body) :], False))
            done = full
        return [(text, flag) for text, flag in pieces if text]

    def encode_row(self, row: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
        input_ids: list[int] = []
        labels: list[int] = []
        for text, supervised in self.segments(row["messages"], tokenizer):
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            input_ids.extend(ids)
            labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))
        input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise RowError(
                "messages",
                f"no assistant tokens left within max_length={self.max_length} "
                "(shorten the conversation or raise task.max_length)",
            )
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    def generation_prompt(self, row: dict[str, Any], tokenizer: Any = None) -> str:
        """The conversation (without a final assistant reply) rendered up to where the
        assistant's reply starts."""
        messages = row["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def decode(self, outputs: Any, rows: Sequence[dict[str, Any]] | None = None) -> list[dict]:
        """Generated texts → assistant messages."""
        return [{"role": "assistant", "content": str(text).strip()} for text in outputs]

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        """ROUGE-L of the reply against each row's final assistant message."""
        refs = [r["messages"][-1]["content"] for r in rows]
        return rouge_scores([p["content"] for p in predictions], refs, types=("rougeL",))
