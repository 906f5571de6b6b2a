"""Tokenizers carrying this project's own versions of the chat templates popular instruction
models ship (``tests/fixtures/chat_templates/*.jinja``), on the tiny byte-level BPE of
``actors.tiny`` with each family's special tokens, BOS/EOS and BOS behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"


@dataclass(frozen=True)
class Family:
    """How one model family's tokenizer and template behave."""

    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    end_of_turn: str
    """What closes an assistant turn in the template."""
    adds_bos: bool = False
    """Whether plain tokenisation prepends BOS (Llama/Mistral/Gemma tokenizers do)."""
    system: bool = True
    """Whether the template accepts a system message."""
    tools: bool = False
    """Whether the template renders tool calls and tool results."""
    trims: bool = False
    """Whether the template strips whitespace at the edges of the content."""


FAMILIES: dict[str, Family] = {
    "qwen2_5": Family(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"),
        None, "<|im_end|>", "<|endoftext|>", "<|im_end|>", tools=True,
    ),
    "llama3_1": Family(
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
        "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|eot_id|>",
        adds_bos=True, tools=True, trims=True,
    ),
    "mistral_v0_3": Family(
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
         "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        "<s>", "</s>", "</s>", "</s>", adds_bos=True, tools=True, trims=True,
    ),
    "gemma": Family(
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>", "<eos>", "<pad>", "<end_of_turn>", adds_bos=True, system=False, trims=True,
    ),
    "gemma3": Family(
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>", "<eos>", "<pad>", "<end_of_turn>", adds_bos=True, trims=True,
    ),
    "phi3": Family(
        ("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<s>", "<|endoftext|>", "<|endoftext|>", "<|end|>", adds_bos=True,
    ),
    "zephyr": Family(("<unk>", "<s>", "</s>"), "<s>", "</s>", "</s>", "</s>", adds_bos=True),
    "qwen3": Family(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
         "</tool_call>", "<tool_response>", "</tool_response>"),
        None, "<|im_end|>", "<|endoftext|>", "<|im_end|>", tools=True,
    ),
}  # fmt: skip


def template_text(family: str) -> str:
    """The Jinja source of ``family``'s template."""
    return (TEMPLATES / f"{family}.jinja").read_text()


@cache
def template_tokenizer(family: str) -> Any:
    """A tiny byte-level BPE tokenizer with ``family``'s special tokens and chat template."""
    from actors.tiny import bpe_tokenizer

    spec = FAMILIES[family]
    tok = bpe_tokenizer(
        chat_template=template_text(family),
        specials=spec.specials,
        bos=spec.bos,
        eos=spec.eos,
        pad=spec.pad,
    )
    if spec.adds_bos:
        tok.add_bos_token = True
        tok.update_post_processor()
    return tok
