"""Dialogue: multi-turn ``messages`` → the assistant's turns, with the tokenizer's chat template.

The training sequence is the template's own rendering ``F`` of the whole conversation, and the
loss mask comes from the structure of the data, never from searching template marker strings:

* **Where a turn starts.** ``P = render(messages[:i], add_generation_prompt=True)`` is the
  prompt a server builds to ask for assistant turn ``i``. When ``F`` starts with ``P`` the turn
  starts right there, so the text in front of the turn is exactly the served prompt.
* **Where a turn ends.** ``V = render(messages[:i + 1])`` is the conversation that ends with
  turn ``i`` (its "own view"). Whatever a template appends after a *finished* conversation
  (Phi-3's end-of-text) is what ``V`` has and ``render(messages[:i + 1],
  add_generation_prompt=True)`` has not, so it is left out; whitespace after the end-of-turn
  marker is not part of the answer either. When ``F`` continues with the turn exactly as ``V``
  renders it, the turn is that text: its content plus its end-of-turn marker(s).
* **Rewritten turns and contexts.** Some templates render a turn, or what comes before it,
  differently once the conversation goes on: Qwen3 and DeepSeek-R1 drop the reasoning of past
  assistant turns; Mistral v0.3 joins the system prompt (and tool list) to the *last* user
  turn only. Then the turn's content is located in ``F`` by rendering ``F`` again with only
  that message's content changed (the characters that change are the content), and the text
  the template puts around the content in the turn's own view (``<think>…</think>`` before it,
  the end-of-turn marker after it) is supervised only where ``F`` contains it unchanged. So
  only what ``F`` contains is supervised, and never system, user or tool text.

Every piece is tokenised on its own (cut at turn starts and ends), so a supervised turn has the
ids the model produces after the served prompt. ``options.layout: per_turn`` trains each
assistant turn on its own sequence instead (the served prompt of that turn + the turn as it is
rendered when it is the latest), which matches serving exactly even for templates that rewrite
history, at the cost of repeating the history once per turn.

ShareGPT (``conversations``) and Alpaca (``instruction``/``input``/``output``) rows are
converted to messages on read; OpenAI ``tool_calls``/``tool`` messages and an assistant
``reasoning_content`` are passed to the template as they are (tool-call ``arguments`` given as
a JSON string become an object, the form Hugging Face templates expect).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.base import IGNORE_INDEX, RowError, Task, TaskError
from tasks.metrics import rouge_scores

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "tool": "tool",
                  "function_response": "tool", "observation": "tool"}  # fmt: skip

# Stand-ins for an assistant message's content when locating it in a rendering. One that does
# not occur in the content is used, so the rendering differs exactly where the content is.
_SENTINELS = ("§", "¤", "¶", "‡", "†", "⁂", "※")


class ToolFunction(BaseModel):
    """The function an assistant calls: its name and arguments."""

    model_config = ConfigDict(strict=True, extra="ignore")

    name: str = Field(min_length=1)
    arguments: dict[str, Any] | str = Field(default_factory=dict)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: dict[str, Any] | str) -> dict[str, Any]:
        # OpenAI sends arguments as a JSON string; HF templates render them with `tojson`, which
        # would quote the string a second time, so they become the object they encode.
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise ValueError("must be a JSON object or a string holding one") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object or a string holding one")
        return parsed


class ToolCall(BaseModel):
    """An OpenAI-format tool call (``{"id", "type": "function", "function": {...}}``)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolFunction

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, data: Any) -> Any:
        # Some datasets write {"name", "arguments"} without the "function" wrapper.
        if isinstance(data, dict) and "function" not in data and "name" in data:
            rest = {k: v for k, v in data.items() if k not in ("name", "arguments")}
            function = {"name": data["name"], "arguments": data.get("arguments", {})}
            return {**rest, "function": function}
        return data


class Message(BaseModel):
    """One chat message (OpenAI form, with the optional tool and reasoning fields)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _fields_fit_role(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(
                f"tool_calls are only allowed on assistant messages, not '{self.role}'"
            )
        if self.reasoning_content is not None and self.role != "assistant":
            raise ValueError("reasoning_content is only allowed on assistant messages")
        if self.role == "assistant" and self.tool_calls and self.content is None:
            self.content = ""  # templates test and concatenate content; null would break them
        if not self.tool_calls:
            self.tool_calls = None
        return self


class DialogueRow(BaseModel):
    """A conversation in OpenAI form (converted from ShareGPT or Alpaca when given those)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="tool (function) definitions, passed to the chat template"
    )

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
            return {"messages": messages, **({"tools": data["tools"]} if "tools" in data else {})}
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
        start = 1 if messages[0].role == "system" else 0
        if len(messages) == start:
            raise ValueError("needs at least one user message after the system message")
        # After the optional system message: user, then assistant; an assistant that calls
        # tools is followed by their results ('tool'), then by an assistant again.
        expected: tuple[str, ...] = ("user",)
        for i, message in enumerate(messages[start:], start=start):
            if message.role not in expected:
                wanted = " or ".join(f"'{e}'" for e in expected)
                raise ValueError(f"message {i} is '{message.role}', expected {wanted}")
            calls = bool(message.tool_calls)
            if not (message.content or "").strip() and not calls:
                raise ValueError(f"message {i} has empty content")
            expected = {
                "user": ("assistant",),
                "assistant": ("tool",) if calls else ("user",),
                "tool": ("tool", "assistant"),
            }[message.role]
        return messages


class DialogueOptions(BaseModel):
    """Which assistant turns are trained on, and in how many sequences."""

    model_config = ConfigDict(extra="forbid")

    train_on: Literal["all", "last"] = Field(
        default="all", description="supervise every assistant turn, or only the last one"
    )
    layout: Literal["conversation", "per_turn"] = Field(
        default="conversation",
        description="one sequence per conversation (the template's rendering of it), or one "
        "per supervised assistant turn (its served prompt + the turn)",
    )


@dataclass(frozen=True)
class Turn:
    """Where one assistant message sits in the rendered conversation (character offsets)."""

    index: int
    """The message's index in ``messages``."""
    start: int
    end: int
    prompt: str | None
    """The served prompt of this turn (``render(messages[:index], add_generation_prompt)``)."""
    own_text: str | None
    """The turn as the template renders it when it is the latest message (None when the
    served prompt is not a prefix of that rendering, so the turn cannot be cut out of it)."""
    prompt_is_prefix: bool
    """Whether the conversation's rendering starts with the served prompt."""
    rewritten: bool
    """Whether the conversation renders this turn differently from its own view."""


def _render(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    generation_prompt: bool = False,
) -> str:
    try:
        return tokenizer.apply_chat_template(
            list(messages), tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # a template's own exception (raise_exception) is about the row
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RowError(
            "messages",
            f"the chat template refuses this conversation ({reason}); change the conversation "
            "to the roles and fields this model's template supports",
        ) from None


def render_chat(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> str:
    """A conversation rendered up to where the assistant's reply starts: the prompt a served
    model is given, exactly as training renders it (``RowError`` when the template refuses)."""
    return _render(tokenizer, messages, tools, generation_prompt=True)


def _added_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    try:
        added = [t for t in tokenizer.get_added_vocab() if t]
    except Exception:  # slow or exotic tokenizers: treat their text as plain characters
        added = list(getattr(tokenizer, "all_special_tokens", []) or [])
    if not added:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(set(added), key=len, reverse=True)))


def _common_prefix(a: str, b: str, added: re.Pattern[str] | None) -> int:
    """Length of the common prefix of ``a`` and ``b``, never ending inside an added token.

    Two renderings that go on with different markers (``<|endoftext|>`` / ``<|assistant|>``)
    share their first characters; the tokenizer reads each marker whole, so a cut between them
    must fall before it.
    """
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    if added is not None and k < max(len(a), len(b)):
        for text in (a, b):
            for match in added.finditer(text, max(0, k - 64), k + 64):
                if match.start() < k < match.end():
                    k = match.start()
    return k


def _content_span(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    index: int,
    rendered: str,
) -> tuple[int, int]:
    """Where message ``index``'s content (and the names of the tools it calls) lies in
    ``rendered``, the rendering of ``messages``: the characters that change when only those
    change. Tool-call names are changed too because some templates do not render the content
    of a turn that calls tools."""
    message = messages[index]
    calls = message.get("tool_calls") or []
    seen = (message.get("content") or "") + "".join(c["function"]["name"] for c in calls)
    sentinel = next((s for s in _SENTINELS if s not in seen), "\x1e")
    changed = [dict(m) for m in messages]
    changed[index]["content"] = sentinel
    if calls:
        changed[index]["tool_calls"] = [
            {**c, "function": {**c["function"], "name": sentinel}} for c in calls
        ]
    other = _render(tokenizer, changed, tools)
    start = 0
    limit = min(len(rendered), len(other))
    while start < limit and rendered[start] == other[start]:
        start += 1
    tail = 0
    while tail < limit - start and rendered[-1 - tail] == other[-1 - tail]:
        tail += 1
    return start, len(rendered) - tail


def _turn_end_in_view(
    tokenizer: Any,
    view_messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    view: str,
    added: re.Pattern[str] | None,
) -> int:
    """End of the last turn in ``view`` without what the template appends after a finished
    conversation: the common prefix of ``view`` and the same messages with a generation prompt
    (which replaces, or follows, that trailing text)."""
    try:
        prompted = _render(tokenizer, view_messages, tools, generation_prompt=True)
    except RowError:
        return len(view)
    return _common_prefix(view, prompted, added)


def _check_tools_rendered(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    full: str,
) -> None:
    """Refuse tool calls and tool results that the template silently drops: a turn trained
    without its call would teach the model to answer with nothing."""
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if not calls and message["role"] != "tool":
            continue
        changed = [dict(m) for m in messages]
        if calls:
            changed[i]["tool_calls"] = [
                {**c, "function": {**c["function"], "name": c["function"]["name"] + "§"}}
                for c in calls
            ]
            what = "tool calls"
        else:
            changed[i]["content"] = (message.get("content") or "") + "§"
            what = "tool results"
        if _render(tokenizer, changed, tools) == full:
            raise RowError(
                "messages",
                f"the chat template does not render {what} (message {i}); use a model whose "
                "chat template supports tools, or drop the tool messages",
            )


def locate_turns(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[Turn]]:
    """The template's rendering of ``messages`` and, for each assistant message, the span of
    its turn (content + end-of-turn marker) in that rendering; see the module docstring."""
    if not getattr(tokenizer, "chat_template", None):
        raise TaskError(
            "the tokenizer has no chat template; use a chat model's tokenizer "
            "(model.tokenizer) for the dialogue task"
        )
    added = _added_token_pattern(tokenizer)
    full = _render(tokenizer, messages, tools)
    _check_tools_rendered(tokenizer, messages, tools, full)
    turns: list[Turn] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], tools, generation_prompt=True)
        view = _render(tokenizer, messages[: i + 1], tools)
        end_in_view = _turn_end_in_view(tokenizer, messages[: i + 1], tools, view, added)
        own_text = None
        if view.startswith(prompt) and end_in_view > len(prompt):
            own_text = view[len(prompt) : end_in_view].rstrip()
        prompt_is_prefix = full.startswith(prompt) and len(prompt) >= done
        if prompt_is_prefix and own_text is not None and full.startswith(own_text, len(prompt)):
            start, end = len(prompt), len(prompt) + len(own_text)
            turns.append(Turn(i, start, end, prompt, own_text, True, False))
            done = end
            continue
        # The turn or its context is rendered differently once the conversation goes on.
        a, b = _content_span(tokenizer, messages, tools, i, full)
        head, tail = _head_and_tail(tokenizer, messages, tools, i, own_text, prompt, view)
        if prompt_is_prefix and len(prompt) <= a:
            start = len(prompt)
        elif head and full.endswith(head, done, a):
            start = a - len(head)
        else:
            start = a
        end = b + len(tail) if tail and full.startswith(tail, b) else b
        if start < done or end <= start:
            continue  # nothing of this turn is in the rendering (or it overlaps the previous)
        rewritten = own_text is not None and full[start:end] != own_text
        turns.append(Turn(i, start, end, prompt, own_text, prompt_is_prefix, rewritten))
        done = end
    return full, turns


def end_of_turn_tokens(tokenizer: Any) -> list[str]:
    """The added token that closes an assistant turn in ``tokenizer``'s chat template, when it
    is not the tokenizer's EOS: Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``, Llama 3's
    ``<|eot_id|>`` (ChatML bundles usually have ``<|im_end|>`` as EOS already). A served model
    must stop there, whatever its ``generation_config`` lists. Found from the template itself:
    the first added token right after the assistant's content in a two-message conversation.
    ``[]`` without a chat template, or when the template renders no such token."""
    cached = getattr(tokenizer, "_taskray_end_of_turn", None)
    if cached is not None:
        return list(cached)
    found: list[str] = []
    added = _added_token_pattern(tokenizer)
    if getattr(tokenizer, "chat_template", None) and added is not None:
        messages = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
        try:
            rendered = _render(tokenizer, messages, None)
            _, end = _content_span(tokenizer, messages, None, 1, rendered)
        except RowError:
            end = -1
        if end >= 0:
            tail = rendered[end:]
            match = added.match(tail, len(tail) - len(tail.lstrip()))
            if match is not None and match.group(0) != tokenizer.eos_token:
                found.append(match.group(0))
    # A tokenizer that refuses attributes is asked again next time.
    with contextlib.suppress(AttributeError):
        tokenizer._taskray_end_of_turn = tuple(found)
    return found


def _head_and_tail(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    index: int,
    own_text: str | None,
    prompt: str,
    view: str,
) -> tuple[str, str]:
    """The text a template renders around assistant ``index``'s content in the turn's own view:
    before it (a leading space, a ``<think>`` block) and after it (the end-of-turn marker)."""
    if own_text is None:
        # The served prompt is not a prefix of the own view (the context moves, e.g. Mistral's
        # system prompt): take the view of the last user message and this turn alone.
        first = max(j for j in range(index) if messages[j]["role"] == "user")
        sub = messages[first : index + 1]
        try:
            prompt = _render(tokenizer, sub[:-1], tools, generation_prompt=True)
            view = _render(tokenizer, sub, tools)
            end = _turn_end_in_view(tokenizer, sub, tools, view, _added_token_pattern(tokenizer))
            located = view.startswith(prompt) and end > len(prompt)
        except RowError:
            located = False
        if not located:
            raise RowError(
                "messages",
                f"the chat template does not render message prefixes as prefixes of each other "
                f"(its prompt for message {index} is not where that reply starts), so the "
                "assistant turn cannot be located; use a template whose generation prompt "
                "ends where the reply begins",
            )
        own_text = view[len(prompt) : end].rstrip()
        messages, index = sub, len(sub) - 1
    a, b = _content_span(tokenizer, messages[: index + 1], tools, index, view)
    a, b = a - len(prompt), b - len(prompt)
    if not 0 <= a <= b <= len(own_text):
        return "", ""
    return own_text[:a], own_text[b:]


class DialogueTask(Task):
    """Chat fine-tuning: loss on assistant content and its end-of-turn token only."""

    name: ClassVar[str] = "dialogue"
    description: ClassVar[str] = "multi-turn messages → assistant turns (ROUGE-L)"
    formulations: ClassVar[dict[str, str]] = {"chat": "causal_lm"}
    row_schema: ClassVar[type[DialogueRow]] = DialogueRow
    options_schema: ClassVar[type[BaseModel] | None] = DialogueOptions

    def _supervised_turns(self, turns: list[Turn], messages: list[dict[str, Any]]) -> set[int]:
        assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant_at:
            raise RowError("messages", "has no assistant message to learn from")
        wanted = set(assistant_at if self.options.train_on == "all" else assistant_at[-1:])
        located = {t.index for t in turns}
        if not wanted & located:
            which = "assistant message" if len(wanted) == 1 else "assistant messages"
            raise RowError(
                "messages",
                f"the chat template's rendering of the conversation does not contain the "
                f"{which} to train on (the template drops or rewrites them); use "
                "train_on: all, or a template that renders assistant turns",
            )
        return wanted

    def segments(
        self,
        messages: list[dict[str, Any]],
        tokenizer: Any,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, supervised) pieces at turn boundaries."""
        assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant_at:
            raise RowError("messages", "has no assistant message to learn from")
        full, turns = locate_turns(messages, tokenizer, tools)
        wanted = self._supervised_turns(turns, messages)
        pieces: list[tuple[str, bool]] = []
        done = 0
        for turn in turns:
            pieces.append((full[done : turn.start], False))
            pieces.append((full[turn.start : turn.end], turn.index in wanted))
            done = turn.end
        pieces.append((full[done:], False))
        return [(text, flag) for text, flag in pieces if text]

    def _encode_pieces(
        self, pieces: list[tuple[str, bool]], tokenizer: Any
    ) -> dict[str, list[int]] | None:
        input_ids: list[int] = []
        labels: list[int] = []
        for text, supervised in pieces:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            input_ids.extend(ids)
            labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))
        input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    def _too_long(self) -> RowError:
        return RowError(
            "messages",
            f"no assistant tokens left within max_length={self.max_length} "
            "(shorten the conversation or raise task.max_length)",
        )

    def encode_row(
        self, row: dict[str, Any], tokenizer: Any
    ) -> dict[str, list[int]] | list[dict[str, list[int]]]:
        """Features of one conversation: one sequence (``layout: conversation``), or a list of
        sequences, one per supervised assistant turn (``layout: per_turn``)."""
        messages, tools = row["messages"], row.get("tools")
        if self.options.layout == "conversation":
            features = self._encode_pieces(self.segments(messages, tokenizer, tools), tokenizer)
            if features is None:
                raise self._too_long()
            return features
        full, turns = locate_turns(messages, tokenizer, tools)
        wanted = self._supervised_turns(turns, messages)
        out = []
        for turn in turns:
            if turn.index not in wanted:
                continue
            prompt = turn.prompt if turn.prompt is not None else full[: turn.start]
            reply = turn.own_text if turn.own_text else full[turn.start : turn.end]
            features = self._encode_pieces([(prompt, False), (reply, True)], tokenizer)
            if features is not None:
                out.append(features)
        if not out:
            raise self._too_long()
        return out

    def generation_prompt(self, row: dict[str, Any], tokenizer: Any = None) -> str:
        """The conversation (without a final assistant reply) rendered up to where the
        assistant's reply starts."""
        messages = row["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return render_chat(tokenizer, messages, row.get("tools"))

    def decode(self, outputs: Any, rows: Sequence[dict[str, Any]] | None = None) -> list[dict]:
        """Generated texts → assistant messages."""
        return [{"role": "assistant", "content": str(text).strip()} for text in outputs]

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        """ROUGE-L of the reply against each row's final assistant message."""
        refs = [r["messages"][-1].get("content") or "" for r in rows]
        return rouge_scores([p["content"] for p in predictions], refs, types=("rougeL",))
