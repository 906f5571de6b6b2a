"""Small byte-level BPE tokenizers built here (no download), with three chat-template styles.

They stand in for GPT-2/Llama/Mistral-family tokenizers in tests: same algorithm (byte-level
BPE), same kinds of special tokens and templates, a vocabulary trained on a few kilobytes.
"""

from __future__ import annotations

from functools import cache

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "[INST] {% if loop.first %}{{ system }}{% endif %}{{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

STYLES = {
    # style: (template, special tokens, bos, eos, pad, end-of-turn)
    "chatml": (
        CHATML,
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
    ),
    "llama3": (
        LLAMA3,
        [
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|end_of_text|>",
        ],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|eot_id|>",
    ),
    "mistral": (
        MISTRAL,
        ["<s>", "</s>", "<unk>", "[INST]", "[/INST]"],
        "<s>",
        "</s>",
        "</s>",
        "</s>",
    ),
}


@cache
def bpe_tokenizer(style: str = "chatml", add_prefix_space: bool = False):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, vocab ~600) with ``style``'s template."""
    from actors.tiny import bpe_tokenizer as build

    template, specials, bos, eos, pad, _ = STYLES[style]
    return build(
        chat_template=template,
        specials=tuple(specials),
        bos=bos,
        eos=eos,
        pad=pad,
        add_prefix_space=add_prefix_space,
    )


def end_of_turn(style: str) -> str:
    """The token that closes an assistant turn in ``style``."""
    return STYLES[style][5]
