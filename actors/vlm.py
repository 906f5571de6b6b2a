"""Vision-language models: a timm vision tower, a projector and any ``transformers`` causal LM.

LLaVA's recipe: patch features from one block of the vision tower are projected (linear, or a
2-layer MLP with GELU) into the LM's embedding space and written over the image placeholder
tokens of the prompt, which the task expanded to one token per visual token.

Written here rather than using ``transformers``' ``LlavaForConditionalGeneration`` because that
class reads the vision tower's hidden states in the layout of HF's own towers (CLS token first,
``(batch, tokens, dim)``), while timm's ``forward_intermediates`` returns prefix-free patch grids
``(batch, dim, h, w)`` and works the same for ViTs and CNNs; and its projector is fixed at two
layers. Everything else is the libraries': timm builds the tower and its image transform
(``resolve_model_data_config`` / ``create_transform``), transformers the LM and ``generate``,
PEFT the LoRA adapters.

A multimodal bundle holds ``lm/`` (the LM's ``save_pretrained`` files; a LoRA adapter is merged
in at export so the bundle stands alone), ``vision.safetensors`` (vision tower and projector),
``vlm.json`` (what rebuilds them: timm name and arguments, feature layer, projector, the image
transform's data config, the number of visual tokens), the tokenizer and ``taskray.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from actors.backend import choose_attention
from actors.config import ModelOptions, VisionOptions
from actors.manifest import BundleError, check_safetensors_only, load_kwargs, read_manifest

VLM_CONFIG = "vlm.json"
VISION_WEIGHTS = "vision.safetensors"
LM_DIR = "lm"
KIND = "vision_causal_lm"


# ----- the vision tower and its image transform ---------------------------------------------
def create_vision_tower(
    name: str, kwargs: dict[str, Any] | None = None, pretrained_file: str | None = None
) -> nn.Module:
    """A timm backbone without a classifier; weights only from a local file (never a hub)."""
    import timm

    extra: dict[str, Any] = {}
    if pretrained_file is not None:
        file = Path(pretrained_file).expanduser()
        if not file.is_file():
            raise ValueError(f"model.vision.pretrained_file not found: {file}")
        extra = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(file.resolve())}}
    try:
        return timm.create_model(name, num_classes=0, **extra, **(kwargs or {}))
    except RuntimeError as err:  # timm's "Unknown model (...)"
        raise ValueError(f"model.vision.name: {err}") from None


def vision_data_config(tower: nn.Module, image_size: int | None = None) -> dict[str, Any]:
    """timm's preprocessing settings for ``tower`` (JSON-able), at its actual input size."""
    from timm.data import resolve_model_data_config

    config = dict(resolve_model_data_config(tower))
    size = image_size
    if size is None:
        # ViTs built with img_size=... keep the pretrained config's resolution in their
        # pretrained_cfg; the patch embedding knows the size the model was actually built for.
        built = getattr(getattr(tower, "patch_embed", None), "img_size", None)
        if built is not None:
            size = built[0] if isinstance(built, (tuple, list)) else int(built)
    if size is not None:
        config["input_size"] = (3, int(size), int(size))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def image_transform(data_config: dict[str, Any]) -> Any:
    """timm's eval transform for a data config (resize, center crop, to tensor, normalise)."""
    from timm.data import create_transform

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    return create_transform(**config, is_training=False)


def patch_features(tower: nn.Module, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """``(batch, tokens, dim)`` patch features of one block (prefix tokens dropped)."""
    (features,) = tower.forward_intermediates(
        pixel_values, indices=[layer], intermediates_only=True
    )
    if features.ndim == 4:  # (B, C, H, W) grid → one token per cell, row-major
        features = features.flatten(2).transpose(1, 2)
    return features


def describe_tower(
    name: str, kwargs: dict[str, Any], image_size: int | None, layer: int
) -> dict[str, Any]:
    """Data config, visual token count and feature width of a tower, without its weights
    (built on the meta device: shapes only)."""
    with torch.device("meta"):
        tower = create_vision_tower(name, kwargs)
        data_config = vision_data_config(tower, image_size)
        probe = torch.zeros(1, *data_config["input_size"])
        try:
            features = patch_features(tower, probe, layer)
        except (IndexError, ValueError, AssertionError) as err:
            raise ValueError(f"model.vision.feature_layer={layer}: {err}") from None
    return {
        "data_config": data_config,
        "num_image_tokens": int(features.shape[1]),
        "vision_dim": int(features.shape[2]),
    }


def make_projector(kind: str, vision_dim: int, lm_dim: int) -> nn.Module:
    """Linear, or LLaVA-1.5's Linear → GELU → Linear."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(vision_dim, lm_dim))
    return nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))


# ----- the model ----------------------------------------------------------------------------
class VisionLanguageModel(nn.Module):
    """Vision tower → projector → causal LM, with image features at the placeholder tokens.

    ``spec`` is what ``vlm.json`` stores; ``image_token_id`` the placeholder's id.
    """

    def __init__(
        self, vision: nn.Module, lm: nn.Module, spec: dict[str, Any], image_token_id: int
    ) -> None:
        super().__init__()
        self.vision = vision
        self.lm = lm
        self.spec = spec
        self.image_token_id = int(image_token_id)
        lm_dim = lm.get_input_embeddings().embedding_dim
        self.projector = make_projector(spec["projector"], spec["vision_dim"], lm_dim)

    @property
    def config(self) -> Any:
        """The LM's config (what FLOP counts and generation defaults read)."""
        return self.lm.config

    @property
    def _no_split_modules(self) -> list[str]:
        # FSDP shards the LM's blocks one by one; the vision tower and projector go with the
        # root (they are small next to the LM, and often frozen).
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return list(getattr(base, "_no_split_modules", None) or [])

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image (= placeholder tokens per prompt)."""
        return int(self.spec["num_image_tokens"])

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected patch features ``(batch, num_image_tokens, lm hidden size)``."""
        dtype = next(self.vision.parameters()).dtype
        features = patch_features(
            self.vision, pixel_values.to(dtype), int(self.spec["feature_layer"])
        )
        return self.projector(features.to(next(self.projector.parameters()).dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each row's image features written over its placeholders."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        per_row = mask.sum(dim=1)
        if pixel_values is None:
            if bool(per_row.any()):
                raise ValueError("the prompt holds image tokens but no image was given")
            return embeds
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"{pixel_values.shape[0]} images for {input_ids.shape[0]} prompts (one each)"
            )
        if bool((per_row != self.num_image_tokens).any()):
            raise ValueError(
                f"each prompt needs exactly {self.num_image_tokens} image tokens "
                f"(got {per_row.tolist()})"
            )
        features = self.image_features(pixel_values).to(embeds.dtype)
        # Row-major fill: row i's placeholders (in order) get image i's tokens (in order).
        return embeds.masked_scatter(mask.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The LM's output on the merged embeddings (``labels`` are not passed: the training
        step computes a token-weighted loss itself)."""
        kwargs.pop("labels", None)
        return self.lm(
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            **kwargs,
        )

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``generate`` from the merged embeddings; returns only the new tokens."""
        return self.lm.generate(
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            **kwargs,
        )

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Recompute the LM's activations in backward."""
        self.lm.gradient_checkpointing_enable(**kwargs)


# ----- building (training) ------------------------------------------------------------------
def is_vlm_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a multimodal bundle."""
    return Path(path, VLM_CONFIG).is_file()


def build_vlm(
    options: ModelOptions,
    tokenizer: Any,
    image_token: str,
    attn: str,
    dtype: torch.dtype,
    path: str,
) -> VisionLanguageModel:
    """The model a multimodal run trains: from a multimodal bundle (a later stage) or from a
    timm tower + an LM, with the stage's parts frozen. ``actors.modeling.build_model`` (the one
    caller) applies LoRA to the LM afterwards when the options ask for it."""
    import transformers

    vision = options.vision or VisionOptions()
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if is_vlm_bundle(path):
        model = _load_model(Path(path), image_token_id, attn, dtype)
    else:
        if vision.name is None:
            raise ValueError(
                "model.vision.name is required (a timm model name) unless model.name_or_path "
                "is a multimodal bundle"
            )
        lm_cls = transformers.AutoModelForCausalLM
        kwargs: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
        if options.init == "random":
            config = transformers.AutoConfig.from_pretrained(path, **kwargs)
            lm = lm_cls.from_config(config, attn_implementation=attn, dtype=dtype)
        else:
            lm = lm_cls.from_pretrained(path, attn_implementation=attn, dtype=dtype, **kwargs)
        tower = create_vision_tower(vision.name, vision.kwargs, vision.pretrained_file)
        spec = {
            "timm_name": vision.name,
            "timm_kwargs": vision.kwargs,
            "feature_layer": vision.feature_layer,
            "projector": vision.projector,
            "image_token": image_token,
            **describe_tower(vision.name, vision.kwargs, vision.image_size, vision.feature_layer),
        }
        model = VisionLanguageModel(tower.to(dtype), lm, spec, image_token_id).to(dtype)
    if len(tokenizer) > model.lm.get_input_embeddings().num_embeddings:
        # A tokenizer that gained the placeholder token needs a row for it.
        model.lm.resize_token_embeddings(len(tokenizer))
    model.vision.requires_grad_(not vision.freeze_vision)
    model.lm.requires_grad_(not vision.freeze_lm)
    model.projector.requires_grad_(True)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ----- bundles ------------------------------------------------------------------------------
def save_vlm(directory: str | Path, model: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Write ``lm/``, ``vision.safetensors`` and ``vlm.json`` from a full (gathered) state dict.

    A LoRA LM is merged first, on a fresh CPU copy built from its config, so the bundle stands
    alone (the vision tower and projector changed too, so there is no base to apply it to).
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lm_state = {k[3:]: v for k, v in state_dict.items() if k.startswith("lm.")}
    rest = {k: v.contiguous() for k, v in state_dict.items() if not k.startswith("lm.")}
    save_file(rest, str(out / VISION_WEIGHTS))
    lm = model.lm
    if hasattr(lm, "merge_and_unload"):
        import transformers
        from peft import get_peft_model

        base = lm.get_base_model()
        fresh = transformers.AutoModelForCausalLM.from_config(base.config)
        peft_config = lm.peft_config[lm.active_adapter]
        merged = get_peft_model(fresh, peft_config)
        merged.load_state_dict(lm_state, strict=False)
        merged.merge_and_unload().save_pretrained(out / LM_DIR, safe_serialization=True)
    else:
        lm.save_pretrained(out / LM_DIR, state_dict=lm_state, safe_serialization=True)
    (out / VLM_CONFIG).write_text(json.dumps(model.spec, indent=2, sort_keys=True))


def _load_model(
    path: Path, image_token_id: int, attn: str, dtype: torch.dtype | None
) -> VisionLanguageModel:
    import transformers
    from safetensors.torch import load_file

    spec = json.loads((path / VLM_CONFIG).read_text())
    tower = create_vision_tower(spec["timm_name"], spec.get("timm_kwargs"))
    kwargs = load_kwargs(attn, dtype)  # safetensors only, never the directory's own code
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(path / LM_DIR), **kwargs)
    model = VisionLanguageModel(tower, lm, spec, image_token_id)
    if dtype is not None:
        model.vision.to(dtype)
        model.projector.to(dtype)
    weights = load_file(str(path / VISION_WEIGHTS))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("lm.")]
    if missing or unexpected:
        raise BundleError(
            f"{path / VISION_WEIGHTS} does not match {spec['timm_name']} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model


@dataclass
class LoadedVlm:
    """A multimodal bundle ready for inference."""

    task: Any
    model: VisionLanguageModel
    tokenizer: Any
    transform: Any
    manifest: dict[str, Any]
    path: str


def load_vlm(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedVlm:
    """Load a multimodal bundle for inference (eval mode, safetensors only, no remote code)."""
    import transformers

    from tasks import task_from_spec

    path = Path(directory).expanduser().resolve()
    manifest = read_manifest(path)
    if manifest["model_kind"] != KIND or not is_vlm_bundle(path):
        raise BundleError(f"{path} is not a multimodal bundle (no {VLM_CONFIG})")
    check_safetensors_only(path)
    check_safetensors_only(path / LM_DIR)
    task = task_from_spec(manifest["task"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    image_token_id = task.image_token_id(tokenizer)
    attn, _ = choose_attention("auto")
    model = _load_model(path, image_token_id, attn, dtype).to(device).eval()
    return LoadedVlm(
        task=task,
        model=model,
        tokenizer=tokenizer,
        transform=image_transform(model.spec["data_config"]),
        manifest=manifest,
        path=str(path),
    )


# ----- inference ----------------------------------------------------------------------------
def pixel_batch(images: list[Any], transform: Any) -> torch.Tensor:
    """Stack PIL images through the model's timm transform."""
    return torch.stack([transform(image) for image in images])


def prompt_batch(
    task: Any, tokenizer: Any, prompts: list[str], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids with the placeholder expanded (as in training) and their mask."""
    encoded = [task.encode_prompt({"prompt": p}, tokenizer) for p in prompts]
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def answer(
    loaded: LoadedVlm,
    images: list[Any],
    prompts: list[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Answer one prompt per image; greedy unless ``temperature`` > 0.

    Returns ``{"text", "completion_tokens", "prompt_tokens"}`` per prompt.
    """
    from actors.generation import stop_token_ids

    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = prompt_batch(loaded.task, tokenizer, prompts, pad_id)
    pixels = pixel_batch(images, loaded.transform)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad_id,
        "eos_token_id": stop_token_ids(tokenizer, model.lm),
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(ids.to(device), mask.to(device), pixels.to(device), **kwargs)
    stops = set(kwargs["eos_token_id"])
    results = []
    for i, row in enumerate(out.tolist()):
        new = []
        for token in row:
            if token in stops:
                break
            new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        results.append(
            {
                "text": loaded.task.decode([text])[0]["text"],
                "completion_tokens": len(new),
                "prompt_tokens": int(mask[i].sum()),
            }
        )
    return results
