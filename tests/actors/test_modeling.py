"""Model building: kinds, attention choice, LoRA, activation checkpointing, tiny models."""

from __future__ import annotations

import pytest
import torch

from actors.config import LoraOptions, ModelOptions
from actors.modeling import AUTO_CLASSES, build_model, choose_attention, choose_dtype


def test_attention_and_dtype_on_cpu():
    attn, reason = choose_attention("auto")
    if not torch.cuda.is_available():
        assert attn == "sdpa" and "CUDA" in reason
        with pytest.raises(ValueError, match="flash_attn"):
            choose_attention("flash_attention_2")
        assert choose_dtype("auto") == torch.float32
    assert choose_dtype("bfloat16") == torch.bfloat16


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("tiny:bert", "sequence_classification"),
        ("tiny:bert", "token_classification"),
        ("tiny:bert", "question_answering"),
        ("tiny:llama", "causal_lm"),
        ("tiny:t5", "seq2seq_lm"),
    ],
)
def test_every_kind_builds_from_tiny_configs(name, kind):
    labels = ["a", "b", "c"] if "classification" in kind else None
    built = build_model(ModelOptions(name_or_path=name, init="random"), kind, labels)
    import transformers

    auto_cls = getattr(transformers, AUTO_CLASSES[kind])
    assert type(built.model) is auto_cls._model_mapping[type(built.model.config)]
    assert built.attn_implementation == choose_attention("auto")[0]
    if labels:
        assert built.model.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_lora_trains_only_adapters_and_the_head():
    options = ModelOptions(name_or_path="tiny:bert", init="random", lora=LoraOptions(r=4))
    model = build_model(options, "sequence_classification", ["x", "y"]).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("lora_A" in n for n in trainable)
    dora = ModelOptions(
        name_or_path="tiny:llama", init="random", lora=LoraOptions(r=4, use_dora=True)
    )
    names = [
        n for n, p in build_model(dora, "causal_lm").model.named_parameters() if p.requires_grad
    ]
    assert any("lora_magnitude_vector" in n for n in names)


def test_gradient_checkpointing_on_request():
    options = ModelOptions(name_or_path="tiny:llama", init="random", gradient_checkpointing=True)
    model = build_model(options, "causal_lm").model
    assert model.is_gradient_checkpointing
    model.train()
    out = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
