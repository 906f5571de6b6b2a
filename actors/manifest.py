"""A bundle's manifest (``taskray.json``) and the checks every bundle reader makes.

Below both readers: ``actors.bundle`` (task models) and ``actors.vlm`` (multimodal bundles)
import from here, so neither imports the other.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks import Task

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


def load_kwargs(attn: str, dtype: Any = None) -> dict[str, Any]:
    """What a bundle reader passes to ``from_pretrained``: safetensors only, the attention
    backend, ``dtype`` when given, and ``trust_remote_code=False`` — not transformers' default
    None: with None, a model that ships its own code makes transformers *ask* on a terminal
    ("run the custom code? [y/N]"), and a "y" runs it. A bundle never runs code of its own."""
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "attn_implementation": attn,
        "trust_remote_code": False,
    }
    if dtype is not None:
        kwargs["dtype"] = dtype
    return kwargs


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
