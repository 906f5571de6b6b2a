"""One optimisation step, for every model kind: batching, forward, token-weighted loss.

Kept apart from the Ray worker loop so it can be checked in a plain process (accumulation
equivalence, FSDP parity) and reused by the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from actors.config import OptimOptions
from actors.modeling import transformer_blocks
from actors.packing import block_causal_mask
from tasks import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")
CAUSAL = ("causal_lm", "vision_causal_lm")
"""Kinds whose logits at position t predict the token at t + 1 (the loss shifts labels)."""
TARGETS = ("labels", "start_positions", "end_positions")


def world() -> tuple[int, int]:
    """(rank, world size), (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(value: float, device: torch.device | str = "cpu") -> float:
    """Sum a number over ranks (a no-op in one process)."""
    if world()[1] == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def collate(
    batch: dict[str, Any],
    pad_token_id: int,
    device: torch.device | str = "cpu",
    packed_mask: bool = True,
) -> dict[str, torch.Tensor]:
    """Pad a numpy batch of ragged features to its longest row, as tensors on ``device``.

    Packed rows (with ``seq_lens``) get a block-diagonal causal ``attention_mask`` so that no
    packed sequence attends to another — or, with ``packed_mask=False`` (flash attention), no
    mask at all: transformers then derives ``cu_seqlens`` from the restarting ``position_ids``
    and runs the varlen kernel.
    """
    out: dict[str, torch.Tensor] = {}
    longest = max(len(x) for x in batch["input_ids"])
    for key in (*MODEL_INPUTS, *TARGETS):
        if key not in batch:
            continue
        values = batch[key]
        if key == "pixel_values":  # fixed-shape images: stack, keep float
            out[key] = torch.as_tensor(np.stack(list(values)), dtype=torch.float32, device=device)
            continue
        if np.asarray(values[0]).ndim == 0:
            out[key] = torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)
            continue
        pad = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
        # Per key: an encoder-decoder's labels are as long as the target, not the input.
        width = max(len(v) for v in values)
        arr = np.full((len(values), width), pad, dtype=np.int64)
        for i, v in enumerate(values):
            arr[i, : len(v)] = v
        out[key] = torch.as_tensor(arr, device=device)
    if "seq_lens" in batch:
        if packed_mask:
            out["attention_mask"] = block_causal_mask(batch["seq_lens"], longest).to(device)
    elif "attention_mask" not in out:
        mask = np.zeros((len(batch["input_ids"]), longest), dtype=np.int64)
        for i, v in enumerate(batch["input_ids"]):
            mask[i, : len(v)] = 1
        out["attention_mask"] = torch.as_tensor(mask, device=device)
    return out


def supervised_count(kind: str, batch: dict[str, torch.Tensor]) -> int:
    """How many targets a micro-batch supervises (known before any forward)."""
    if kind == "question_answering":
        return int(batch["start_positions"].shape[0])
    labels = batch["labels"]
    if kind in CAUSAL:
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def forward_loss(kind: str, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """Summed loss of a micro-batch and the model output.

    Summing (not averaging) lets the caller divide by the supervised count of the whole global
    batch — across accumulation steps and ranks — instead of averaging per-micro-batch means.
    """
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if kind == "question_answering":
        out = model(**inputs)
        loss = (
            _ce_sum(out.start_logits, batch["start_positions"])
            + _ce_sum(out.end_logits, batch["end_positions"])
        ) / 2
        return loss, out
    labels = batch["labels"]
    if kind == "seq2seq_lm":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        inputs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
        out = model(**inputs)
        return _ce_sum(out.logits, labels), out
    out = model(**inputs)
    if kind in CAUSAL:
        return _ce_sum(out.logits[:, :-1, :], labels[:, 1:]), out
    return _ce_sum(out.logits, labels), out


def accumulate(
    kind: str, model: Any, micro_batches: Sequence[dict[str, torch.Tensor]], device: Any = "cpu"
) -> tuple[float, float]:
    """Forward/backward over one optimizer step's micro-batches; returns (loss sum, count) of
    the global batch. Gradients end up as the mean over all supervised targets of all ranks'
    micro-batches (FSDP's reduce averages over ranks, hence the ``world`` factor)."""
    _, size = world()
    local = sum(supervised_count(kind, b) for b in micro_batches)
    total = all_sum(local, device)
    loss_sum = 0.0
    for batch in micro_batches:
        loss, _ = forward_loss(kind, model, batch)
        (loss * size / max(total, 1.0)).backward()
        loss_sum += float(loss.detach())
    return all_sum(loss_sum, device), total


def shard_model(
    model: torch.nn.Module, use_gpu: bool, cpu_offload: bool = False
) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cuda" if use_gpu else "cpu", (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if use_gpu and torch.cuda.is_bf16_supported():
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in reversed(transformer_blocks(model)):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def make_optimizer(model: torch.nn.Module, optim: OptimOptions) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms (the usual transformer recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lname = name.lower()
        if param.ndim < 2 or "norm" in lname or lname.endswith("bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr)


# ----- evaluation ---------------------------------------------------------------------------
