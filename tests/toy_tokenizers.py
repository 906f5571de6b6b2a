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

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 times 7? Answer: 84",
    "Tim Cook leads Apple, which is based in Cupertino, California.",
    "Summarize the following article in one sentence.",
    "Translate English to German: The weather is nice today. Das Wetter ist heute schön.",
    "You are a helpful assistant. Please answer briefly and politely.",
    "Sentiment: Positive Negative neutral entailment contradiction",
    "0123456789 + - * / = ( ) [ ] { } < > ' \" , . ; : ! ? é ü ß ç",
]


@cache
def bpe_tokenizer(style: str = "chatml", add_prefix_space: bool = False):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, vocab ~600) with ``style``'s template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    template, specials, bos, eos, pad, _ = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)],
        add_prefix_space=add_prefix_space,
    )
    fast.chat_template = template
    return fast


def end_of_turn(style: str) -> str:
    """The token that closes an assistant turn in ``style``."""
    return STYLES[style][5]
