"""The prompt ``/v1/chat/completions`` gives a text model (no Ray): tool calls, tool results
and reasoning reach the chat template, rendered by the function training uses, and messages
the dialogue task would refuse are 422s naming the message."""

from __future__ import annotations

import json

import pytest
from fastapi import HTTPException

from serve.routes.openai import chat_prompt
from serve.schemas import ChatRequest
from tasks import get_task
from tests.tasks.template_tokenizers import template_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def _prompt(family: str, body: dict) -> str:
    request = ChatRequest.model_validate({"model": "m", **body})
    return chat_prompt(template_tokenizer(family), request.messages, request.tools, "m")


@pytest.mark.parametrize("family", ["qwen2_5", "llama3_1", "mistral_v0_3"])
def test_a_tool_conversation_is_served_as_trained(family):
    """OpenAI sends tool-call arguments as a JSON string; the served prompt equals the dialogue
    task's rendering of the same conversation (arguments as the object they encode)."""
    arguments = json.dumps({"city": "Oslo"})
    call = {"id": "a1b2c3d4e", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [
        {"role": "user", "content": "Is it raining in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {
            "role": "tool",
            "tool_call_id": "a1b2c3d4e",
            "name": "get_weather",
            "content": '{"rain_mm": 4}',
        },
    ]
    served = _prompt(family, {"messages": messages, "tools": [WEATHER]})
    trained_call = {**call, "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    assistant = {"role": "assistant", "content": "", "tool_calls": [trained_call]}
    row = {"messages": [messages[0], assistant, messages[2]], "tools": [WEATHER]}
    tok = template_tokenizer(family)
    assert served == get_task("dialogue").generation_prompt(row, tok)
    assert "get_weather" in served and "rain_mm" in served and "Oslo" in served


def test_plain_messages_render_as_the_template_does():
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    tok = template_tokenizer("qwen2_5")
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert _prompt("qwen2_5", {"messages": messages}) == expected


def test_reasoning_content_reaches_the_template():
    """Qwen3 renders an assistant turn's reasoning when it comes after the last user message
    (here: the turn that called a tool); the served prompt is the dialogue task's rendering."""
    call = {"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    thought = "I should look the weather up"
    messages = [
        {"role": "user", "content": "Is it raining in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call], "reasoning_content": thought},
        {"role": "tool", "content": '{"rain_mm": 4}'},
    ]
    served = _prompt("qwen3", {"messages": messages, "tools": [WEATHER]})
    assert f"<think>\n{thought}\n</think>" in served
    tok = template_tokenizer("qwen3")
    task = get_task("dialogue")
    row = task.validate({"messages": messages, "tools": [WEATHER]})
    assert served == task.generation_prompt(row, tok)


USER = {"role": "user", "content": "hi"}
BAD_ARGUMENTS = {
    "role": "assistant",
    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
}
IMAGE = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
SYSTEM = {"role": "system", "content": "sys"}


@pytest.mark.parametrize(
    ("family", "messages", "says"),
    [
        ("qwen2_5", [{"role": "user", "content": None}], "messages.0.content: required"),
        ("qwen2_5", [{**USER, "tool_calls": [{"function": {"name": "f"}}]}],
         "messages.0: tool_calls are only allowed on assistant messages"),
        ("qwen2_5", [USER, BAD_ARGUMENTS], "messages.1.tool_calls.0.function.arguments"),
        ("qwen2_5", [IMAGE], "takes text only"),
        ("gemma", [SYSTEM, USER], "the chat template refuses this conversation"),
    ],
)  # fmt: skip
def test_messages_the_dialogue_task_refuses_are_422(family, messages, says):
    with pytest.raises(HTTPException) as caught:
        _prompt(family, {"messages": messages})
    assert caught.value.status_code == 422
    assert says in caught.value.detail
