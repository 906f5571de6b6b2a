"""Typed options consumed inside Ray workers (model building and the training loop).

The entry-point configs in ``cluster.config`` compose these; they live here because the worker
code that reads them must not import ``cluster`` (imports only go leftwards).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid")


class LoraOptions(Strict):
    """PEFT LoRA (or DoRA) adapters, applied before sharding."""

    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        default=None,
        description="module names or 'all-linear'; None = PEFT's default for the architecture",
    )
    use_dora: bool = False
    merge: bool = Field(default=False, description="export the base with the adapter merged in")


class VisionOptions(Strict):
    """The vision side of a vision-language model (the ``multimodal`` task).

    Stages are set by what is frozen: projector only (``freeze_vision`` and ``freeze_lm``),
    then projector + LM (``freeze_lm: false``, or ``model.lora`` for LoRA on the LM), with the
    vision tower optionally unfrozen. A later stage starts from the earlier stage's bundle
    (``model.name_or_path: runs/stage1/bundle``), whose vision settings it keeps.
    """

    name: str | None = Field(
        default=None,
        description="timm model name (e.g. vit_base_patch16_clip_224); None when "
        "model.name_or_path is a multimodal bundle",
    )
    pretrained_file: str | None = Field(
        default=None,
        description="local weights file for the vision tower (.safetensors); None = random init",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra timm.create_model arguments (img_size, depth...)"
    )
    image_size: int | None = Field(
        default=None, ge=8, description="input resolution; None = the model's own"
    )
    feature_layer: int = Field(
        default=-2, description="which block's patch features feed the projector (LLaVA: -2)"
    )
    projector: Literal["linear", "mlp"] = Field(
        default="mlp", description="linear, or a 2-layer MLP with GELU (LLaVA-1.5)"
    )
    freeze_vision: bool = True
    freeze_lm: bool = False


class ModelOptions(Strict):
    """Which model to fine-tune and how to build it."""

    name_or_path: str = Field(description="HF model name, local directory, or a bundle")
    init: Literal["pretrained", "random"] = Field(
        default="pretrained",
        description="'random' builds the architecture from its config with fresh weights",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto = bf16 on GPUs that support it, fp32 on CPU"
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        default="auto", description="auto = flash_attention_2 with CUDA + flash_attn, else sdpa"
    )
    trust_remote_code: bool = Field(
        default=False, description="run code shipped with the model (off unless you trust it)"
    )
    tokenizer: str | None = Field(default=None, description="tokenizer path when not the model's")
    lora: LoraOptions | None = Field(default=None, description="train LoRA adapters only")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute activations in backward to save memory"
    )
    cpu_offload: bool = Field(
        default=False, description="FSDP2: keep sharded parameters and optimizer state on CPU"
    )
    vision: VisionOptions | None = Field(
        default=None, description="vision tower and projector (multimodal task only)"
    )


class OptimOptions(Strict):
    """Optimisation and schedule of the training loop."""

    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=16, ge=1, description="micro-batch size per worker")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    log_every: int = Field(default=10, ge=1, description="log a progress line every N steps")
    select_metric: str | None = Field(
        default=None,
        description="export the epoch with the best value of this metric (e.g. accuracy); "
        "None exports the last epoch",
    )
    eval_batch_size: int = Field(default=64, ge=1)
    eval_generate_rows: int = Field(
        default=32, ge=0, description="validation rows decoded with generate (generative tasks)"
    )
    eval_max_new_tokens: int = Field(default=64, ge=1)
    checkpoint_every: int | None = Field(
        default=None,
        ge=1,
        description="also checkpoint every N optimizer steps (mid-epoch resume point); "
        "None = at each epoch end only",
    )
    peak_flops: float | None = Field(
        default=None, gt=0, description="per-worker peak FLOP/s for MFU; None = measure a matmul"
    )
