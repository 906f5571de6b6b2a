"""The artifact bundle: the hand-off from training to serving.

A bundle is a directory with the HF ``save_pretrained`` files of the model (safetensors), the
tokenizer, and ``taskray.json`` describing the task, model kind, labels, max length, base model,
final metrics and package versions. Serving loads only bundles or plain HF model directories,
and only from safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.backend import choose_attention
from actors.manifest import (
    BUNDLE_FORMAT,
    MANIFEST,
    PICKLE_SUFFIXES,
    BundleError,
    check_safetensors_only,
    load_kwargs,
    package_versions,
    read_manifest,
    write_manifest,
)
from actors.modeling import AUTO_CLASSES, resolve_model_path
from tasks import Task, task_from_spec

# The manifest and its checks live in actors.manifest (below this module and actors.vlm);
# they stay importable from here, where every caller has always found them.
__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST",
    "PICKLE_SUFFIXES",
    "BundleError",
    "LoadedBundle",
    "check_safetensors_only",
    "load_bundle",
    "package_versions",
    "read_manifest",
    "write_manifest",
]


@dataclass
class LoadedBundle:
    """A model ready for inference with its task, tokenizer and manifest."""

    task: Task
    model: Any
    tokenizer: Any
    manifest: dict[str, Any]
    path: str


def load_bundle(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedBundle:
    """Load a bundle for inference (eval mode, safetensors only, no remote code)."""
    import transformers

    path = Path(resolve_model_path(str(directory)))
    manifest = read_manifest(path)
    check_safetensors_only(path)
    task = task_from_spec(manifest["task"])
    kind = manifest["model_kind"]
    if kind not in AUTO_CLASSES:
        raise BundleError(f"bundle {path} has an unknown model kind '{kind}'")
    auto_cls = getattr(transformers, AUTO_CLASSES[kind])
    kwargs = load_kwargs(choose_attention("auto")[0], dtype)  # no code of the bundle's own
    if manifest.get("adapter"):
        # A LoRA bundle: the base comes from where it was trained from, the adapter from here.
        from peft import PeftModel

        base_path = resolve_model_path(manifest["base_model"])
        label_kwargs = {}
        if manifest.get("label_names") and kind in (
            "sequence_classification",
            "token_classification",
        ):
            label_kwargs = {"num_labels": len(manifest["label_names"])}
        base = auto_cls.from_pretrained(base_path, **kwargs, **label_kwargs)
        model = PeftModel.from_pretrained(base, str(path)).to(device).eval()
    else:
        model = auto_cls.from_pretrained(str(path), **kwargs).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    return LoadedBundle(
        task=task, model=model, tokenizer=tokenizer, manifest=manifest, path=str(path)
    )
