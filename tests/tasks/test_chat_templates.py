"""Dialogue masks on the chat templates real instruction models ship (this project's own
versions, in tests/fixtures/chat_templates): every supervised span is exactly one assistant
turn's text plus its end-of-turn marker, nothing of system/user/tool text is supervised, the
ids in front of a turn are the ids the server builds for that prompt, and the causal families
(generation, reasoning, rag) stay consistent on these tokenizers too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import IGNORE_INDEX, RowError, get_task
from tasks.dialogue import locate_turns
from tests.tasks.template_tokenizers import FAMILIES, template_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data" / "fixtures"
SYSTEM = {"role": "system", "content": "You answer briefly."}
EXCHANGES = [
    ("How long should I boil an egg?", "About six and a half minutes."),
    ("  And for a hard yolk?  ", "\n Ten minutes, then cold water. \n"),
    ("Why the cold water?", "It stops the cooking and makes peeling easier."),
    ("Thanks!", " You're welcome. "),
]


def conversation(turns: int, system: bool) -> list[dict]:
    messages = [dict(SYSTEM)] if system else []
    for user, assistant in EXCHANGES[:turns]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def runs(features: dict) -> list[tuple[int, list[int]]]:
    """(start position, ids) of each contiguous supervised span."""
    out: list[tuple[int, list[int]]] = []
    for k, (token, label) in enumerate(zip(features["input_ids"], features["labels"], strict=True)):
        if label == IGNORE_INDEX:
            continue
        if out and out[-1][0] + len(out[-1][1]) == k:
            out[-1][1].append(token)
        else:
            out.append((k, [token]))
    return out


def expected_turn(family: str, content: str, reasoning: str | None = None) -> str:
    """An assistant turn as the family's template writes it when it is the latest turn."""
    spec = FAMILIES[family]
    text = content.strip() if spec.trims else content
    if family == "mistral_v0_3":
        text = " " + text
    if family == "qwen3":
        text = f"<think>\n{(reasoning or '').strip()}\n</think>\n\n{text.lstrip(chr(10))}"
    return text + spec.end_of_turn


def served_ids(tok, messages: list[dict], tools: list | None = None) -> list[int]:
    """What the server tokenises for the next assistant turn: the dialogue task's generation
    prompt (the template with add_generation_prompt), without added special tokens, as
    serve/app.py and actors/engine.py do."""
    row = {"messages": messages, **({"tools": tools} if tools else {})}
    prompt = get_task("dialogue").generation_prompt(row, tok)
    return tok(prompt, add_special_tokens=False)["input_ids"]


CASES = [
    (family, turns, system)
    for family in FAMILIES
    for turns in (1, 2, 4)
    for system in (False, True)
    if FAMILIES[family].system or not system
]


@pytest.mark.parametrize(("family", "turns", "system"), CASES)
def test_each_assistant_turn_is_supervised_exactly(family, turns, system):
    tok = template_tokenizer(family)
    task = get_task("dialogue", max_length=4096)
    row = task.validate({"messages": conversation(turns, system)})
    messages = row["messages"]
    features = task.encode_row(row, tok)
    # The sequence is the template's own rendering of the whole conversation.
    assert tok.decode(features["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    spans = runs(features)
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(spans) == len(assistant_at)
    eot_id = tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    for (start, ids), i in zip(spans, assistant_at, strict=True):
        last = i == len(messages) - 1
        content = messages[i]["content"]
        if family == "qwen3" and not last:
            # Past turns are rendered without their (empty) reasoning block: only that is trained.
            assert tok.decode(ids) == content + "<|im_end|>"
        else:
            assert tok.decode(ids) == expected_turn(family, content)
        assert ids[-1] == eot_id
        # No user or system text is trained on.
        for other in messages:
            if other["role"] != "assistant" and other["content"].strip():
                assert other["content"].strip() not in tok.decode(ids)
        # Train/serve consistency: what precedes the turn is what the server builds for it
        # (Mistral v0.3 puts the system prompt only into served prompts; see the next test).
        if not (family == "mistral_v0_3" and system):
            assert features["input_ids"][:start] == served_ids(tok, messages[:i])


def test_phi3_end_of_text_after_the_conversation_is_not_trained():
    tok = template_tokenizer("phi3")
    task = get_task("dialogue", max_length=4096)
    row = task.validate({"messages": conversation(2, True)})
    features = task.encode_row(row, tok)
    assert features["input_ids"][-1] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert features["labels"][-1] == IGNORE_INDEX
    assert [tok.decode(ids) for _, ids in runs(features)] == [
        expected_turn("phi3", EXCHANGES[0][1]),
        expected_turn("phi3", EXCHANGES[1][1]),
    ]


def test_mistral_system_prompt_joined_to_the_last_user_turn():
    tok = template_tokenizer("mistral_v0_3")
    messages = get_task("dialogue").validate({"messages": conversation(3, True)})["messages"]
    full = tok.apply_chat_template(messages, tokenize=False)
    # The template shows the system prompt only in a prompt that ends with a user turn.
    assert SYSTEM["content"] not in full
    assert SYSTEM["content"] in tok.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    _, turns = locate_turns(messages, tok)
    assert all(not t.prompt_is_prefix for t in turns)
    # layout: conversation trains on the rendering, which has no system prompt.
    conv = get_task("dialogue", max_length=4096).encode_row({"messages": messages}, tok)
    assert [tok.decode(ids) for _, ids in runs(conv)] == [
        expected_turn("mistral_v0_3", c) for _, c in EXCHANGES[:3]
    ]
    # layout: per_turn trains each turn after exactly the prompt the server builds for it.
    per_turn = get_task("dialogue", max_length=4096, options={"layout": "per_turn"})
    examples = per_turn.encode_row({"messages": messages}, tok)
    assert len(examples) == 3
    for k, features in enumerate(examples):
        i = 2 + 2 * k
        ((start, ids),) = runs(features)
        assert features["input_ids"][:start] == served_ids(tok, messages[:i])
        assert tok.decode(ids) == expected_turn("mistral_v0_3", messages[i]["content"])
        assert start + len(ids) == len(features["input_ids"])


def test_gemma_refuses_a_system_message_with_a_clear_error():
    tok = template_tokenizer("gemma")
    row = get_task("dialogue").validate({"messages": conversation(1, True)})
    with pytest.raises(RowError, match="System role not supported") as info:
        get_task("dialogue").encode_row(row, tok)
    assert info.value.field == "messages" and "\n" not in str(info.value)
    # Gemma 3 folds the system prompt into the first user turn instead: not trained on.
    features = get_task("dialogue").encode_row(row, template_tokenizer("gemma3"))
    assert SYSTEM["content"] in template_tokenizer("gemma3").decode(features["input_ids"])
    assert len(runs(features)) == 1


def reasoning_conversation() -> list[dict]:
    return [
        {"role": "user", "content": "What is 12 times 7?"},
        {"role": "assistant", "content": "84.", "reasoning_content": "12 * 7 = 84."},
        {"role": "user", "content": "And plus 6?"},
        {"role": "assistant", "content": "<think>\n84 + 6 = 90.\n</think>\n\n90."},
    ]


def test_qwen3_reasoning_of_past_turns_is_not_in_the_conversation():
    tok = template_tokenizer("qwen3")
    task = get_task("dialogue", max_length=4096)
    row = task.validate({"messages": reasoning_conversation()})
    features = task.encode_row(row, tok)
    text = tok.decode(features["input_ids"])
    assert "12 * 7 = 84." not in text  # stripped from history by the template
    spans = [tok.decode(ids) for _, ids in runs(features)]
    assert spans == ["84.<|im_end|>", "<think>\n84 + 6 = 90.\n</think>\n\n90.<|im_end|>"]
    _, turns = locate_turns(row["messages"], tok)
    assert [t.rewritten for t in turns] == [True, False]
    # per_turn trains each turn with its own reasoning, after the served prompt.
    per_turn = get_task("dialogue", max_length=4096, options={"layout": "per_turn"})
    first, second = per_turn.encode_row(row, tok)
    ((start, ids),) = runs(first)
    assert tok.decode(ids) == "<think>\n12 * 7 = 84.\n</think>\n\n84.<|im_end|>"
    assert first["input_ids"][:start] == served_ids(tok, row["messages"][:1])
    ((start, ids),) = runs(second)
    assert second["input_ids"][:start] == served_ids(tok, row["messages"][:3])
    # train_on: last supervises only the final turn, reasoning included.
    last = get_task("dialogue", max_length=4096, options={"train_on": "last"})
    assert [tok.decode(ids) for _, ids in runs(last.encode_row(row, tok))] == spans[1:]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def tool_conversation() -> list[dict]:
    return [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call00001",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call00001", "content": '{"celsius": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]


TOOL_CALL_TEXT = {
    "qwen2_5": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call><|im_end|>",
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call><|im_end|>",
    "llama3_1": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
    "mistral_v0_3": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, '
    '"id": "call00001"}]</s>',
}


@pytest.mark.parametrize("family", sorted(TOOL_CALL_TEXT))
@pytest.mark.parametrize("layout", ["conversation", "per_turn"])
def test_tool_calls_are_trained_and_tool_results_never(family, layout):
    tok = template_tokenizer(family)
    task = get_task("dialogue", max_length=4096, options={"layout": layout})
    row = task.validate({"messages": tool_conversation(), "tools": TOOLS})
    encoded = task.encode_row(row, tok)
    examples = encoded if isinstance(encoded, list) else [encoded]
    spans = [tok.decode(ids) for f in examples for _, ids in runs(f)]
    assert len(spans) == 3
    if family == "qwen3" and layout == "per_turn":
        # As the latest turn, Qwen3 renders the call after its (empty) reasoning block.
        assert spans[0] == "<think>\n\n</think>\n\n" + TOOL_CALL_TEXT[family]
    else:
        assert spans[0] == TOOL_CALL_TEXT[family]
    assert spans[1].endswith("It is 21 degrees in Paris." + FAMILIES[family].end_of_turn)
    assert spans[2].endswith("You're welcome." + FAMILIES[family].end_of_turn)
    for span in spans:
        assert "celsius" not in span and "Weather in Paris?" not in span
        assert "Current weather" not in span
    if layout == "conversation" and family != "mistral_v0_3":
        # Where the served prompt is a prefix of the conversation, the ids in front agree.
        _, turns = locate_turns(row["messages"], tok, TOOLS)
        for (start, _), turn in zip(runs(encoded), turns, strict=True):
            if turn.prompt_is_prefix:
                messages = row["messages"][: turn.index]
                assert encoded["input_ids"][:start] == served_ids(tok, messages, TOOLS)


@pytest.mark.parametrize("family", ["phi3", "zephyr", "gemma3"])
def test_templates_without_tools_refuse_tool_messages(family):
    messages = [m for m in tool_conversation() if m["role"] != "system"]
    row = get_task("dialogue").validate({"messages": messages, "tools": TOOLS})
    with pytest.raises(RowError) as info:
        get_task("dialogue").encode_row(row, template_tokenizer(family))
    assert info.value.field == "messages"
    assert "tool" in info.value.reason or "template" in info.value.reason


def test_tool_message_schema():
    task = get_task("dialogue")
    row = task.validate({"messages": tool_conversation()})
    call = row["messages"][2]["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Paris"}
    assert row["messages"][2]["content"] == ""
    bad = tool_conversation()
    bad[2]["tool_calls"][0]["function"]["arguments"] = "not json"
    with pytest.raises(RowError, match="JSON object"):
        task.validate({"messages": bad})
    with pytest.raises(RowError, match="expected 'user'"):
        task.validate({"messages": [{"role": "tool", "content": "x"}]})
    orphan = [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]
    with pytest.raises(RowError, match="message 1 is 'tool', expected 'assistant'"):
        task.validate({"messages": orphan})
    with pytest.raises(RowError, match="tool_calls are only allowed on assistant"):
        task.validate({"messages": [{"role": "user", "content": "a", "tool_calls": [call]}]})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_truncation_keeps_a_prefix_and_reports_empty_targets(family):
    tok = template_tokenizer(family)
    row = get_task("dialogue").validate({"messages": conversation(2, False)})
    full = get_task("dialogue", max_length=4096).encode_row(row, tok)
    (first_start, first_ids), (second_start, _) = runs(full)
    cut = get_task("dialogue", max_length=second_start + 2).encode_row(row, tok)
    assert cut["input_ids"] == full["input_ids"][: second_start + 2]
    assert [ids for _, ids in runs(cut)] == [first_ids, full["input_ids"][second_start:][:2]]
    with pytest.raises(RowError, match="no assistant tokens left within max_length"):
        get_task("dialogue", max_length=max(8, first_start)).encode_row(row, tok)
    per_turn = get_task("dialogue", max_length=second_start + 2, options={"layout": "per_turn"})
    examples = per_turn.encode_row(row, tok)
    assert len(examples) >= 1 and all(len(f["input_ids"]) <= second_start + 2 for f in examples)


# ----- causal families on these tokenizers ---------------------------------------------------
def fixture(name: str, limit: int) -> list[dict]:
    lines = (DATA / f"{name}.jsonl").read_text().splitlines()[:limit]
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("task_name", ["generation", "reasoning", "rag"])
def test_causal_rows_match_the_served_prompt_and_end_with_eos(family, task_name):
    tok = template_tokenizer(family)
    task = get_task(task_name, max_length=2048)
    for raw in fixture(task_name, 5):
        row = task.validate(raw)
        features = task.encode_row(row, tok)
        pairs = zip(features["input_ids"], features["labels"], strict=True)
        supervised = [i for i, lab in pairs if lab != IGNORE_INDEX]
        n_prompt = len(features["input_ids"]) - len(supervised)
        # The server tokenises generation_prompt without adding special tokens.
        served = tok(task.generation_prompt(row, tok), add_special_tokens=False)["input_ids"]
        assert features["input_ids"][:n_prompt] == served
        assert (served[0] == tok.bos_token_id) == FAMILIES[family].adds_bos
        # The target ends with the tokenizer's EOS, which the server stops on.
        assert supervised[-1] == tok.eos_token_id
        target = task.target(row) if task_name != "rag" else None
        if target is not None:
            assert supervised[:-1] == tok(target, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_serving_stops_at_the_templates_end_of_turn(family):
    """The token that closes an assistant turn ends generation even when it is not the EOS
    (Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``): found from the template, not a list."""
    from actors.generation import stop_token_ids
    from tasks.dialogue import end_of_turn_tokens

    spec = FAMILIES[family]
    tok = template_tokenizer(family)
    stops = stop_token_ids(tok, None)
    assert tok.convert_tokens_to_ids(spec.end_of_turn) in stops
    assert tok.eos_token_id in stops
    expected = [] if spec.end_of_turn == spec.eos else [spec.end_of_turn]
    assert end_of_turn_tokens(tok) == expected


def test_no_chat_template_adds_no_stop_token():
    from actors.generation import stop_token_ids
    from actors.tiny import bpe_tokenizer
    from tasks.dialogue import end_of_turn_tokens

    tok = bpe_tokenizer(chat_template=None, specials=("<s>", "</s>", "<|end|>"), bos="<s>",
                        eos="</s>", pad="</s>")  # fmt: skip
    assert end_of_turn_tokens(tok) == []
    assert stop_token_ids(tok, None) == [tok.eos_token_id]
