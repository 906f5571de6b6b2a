"""The artifact bundle: the hand-off from training to serving.

A bundle is a directory with the HF ``save_pretrained`` files of the model (safetensors), the
tokenizer, and ``taskray.json`` describing the task, model kind, labels, max length, base model,
final metrics and package versions. Serving loads only bundles or plain HF model directories,
and only from safetensors.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from actors.modeling import AUTO_CLASSES, choose_attention, resolve_model_path
from tasks import Task, task_from_spec

MANIFEST = "taskray.json"
BUNDLE_FORMAT = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class BundleError(ValueError):
    """A directory that is not a loadable bundle; the message says what is wrong."""


def package_versions() -> dict[str, str]:
    """Versions of the packages a bundle depends on (recorded for reproducibility)."""
    out = {"python": platform.python_version()}
    for name in ("taskray", "torch", "transformers", "peft", "ray", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(
    directory: str | Path,
    task: Task,
    base_model: str,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``taskray.json`` next to the model files and return its content."""
    manifest = {
        "format": BUNDLE_FORMAT,
        "task": task.spec(),
        "model_kind": task.model_kind,
        "label_names": task.labels,
        "max_length": task.max_length,
        "base_model": base_model,
        "metrics": metrics or {},
        "versions": package_versions(),
    }
    if extra:
        manifest.update(extra)
    Path(directory, MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check ``taskray.json``; a missing or malformed one is a ``BundleError``."""
    path = Path(directory)
    if not path.is_dir():
        raise BundleError(f"bundle not found: {path} is not a directory")
    file = path / MANIFEST
    if not file.is_file():
        raise BundleError(f"{path} is not a taskray bundle (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{file} is not valid JSON: {err.msg}") from None
    for key in ("task", "model_kind"):
        if key not in manifest:
            raise BundleError(f"{file} lacks the '{key}' entry")
    return manifest


def check_safetensors_only(directory: str | Path) -> None:
    """Refuse a bundle that carries pickled weights (they can run code when loaded)."""
    path = Path(directory)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise BundleError(
            f"{path} contains pickle files ({', '.join(pickles)}); taskray loads weights from "
            "safetensors only — re-save the model with save_pretrained(safe_serialization=True)"
        )
    if not any(path.glob("*.safetensors")):  # model.safetensors or adapter_model.safetensors
        raise BundleError(f"{path} has no .safetensors weights")


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
    attn, _ = choose_attention("auto")
    # trust_remote_code=False, not transformers' default None: with None, a model that ships
    # its own code makes transformers *ask* on a terminal ("run the custom code? [y/N]"), and a
    # "y" runs it. A bundle never runs code of its own.
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "attn_implementation": attn,
        "trust_remote_code": False,
    }
    if dtype is not None:
        kwargs["dtype"] = dtype
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
