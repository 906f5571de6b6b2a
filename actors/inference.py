"""In-process inference over a loaded bundle, shared by `taskray evaluate` and Serve replicas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from actors.bundle import LoadedBundle


def predict_classification(
    bundle: LoadedBundle, texts: Sequence[str], all_scores: bool = False
) -> list[dict[str, Any]]:
    """Classify a batch of texts with a sequence-classification bundle."""
    enc = bundle.tokenizer(
        list(texts),
        truncation=True,
        max_length=bundle.task.max_length,
        padding=True,
        return_tensors="pt",
    )
    device = next(bundle.model.parameters()).device
    with torch.inference_mode():
        logits = bundle.model(**{k: v.to(device) for k, v in enc.items()}).logits
    return bundle.task.decode(logits.float().cpu().numpy(), all_scores=all_scores)
