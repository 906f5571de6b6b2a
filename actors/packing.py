"""Sequence packing for causal LMs: best-fit-decreasing into ``max_length`` bins.

Each packed row keeps its sequences' boundaries (``seq_lens``) and ``position_ids`` that restart
at 0 per sequence. Attention must not cross those boundaries: with flash attention the varlen
kernel gets ``cu_seqlens``; with SDPA/eager, ``block_causal_mask`` builds the 4D mask (restarting
positions alone is not enough: the later sequence would still attend to the earlier one).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from tasks import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length ≤ ``capacity`` (longest first, each into the
    fullest bin it fits). O(n log n) with a sorted list of remaining capacities."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence of {n} tokens exceeds the pack length {capacity}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            remaining, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (remaining - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def pack_batch(batch: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Ray Data UDF: pack a batch of tokenised causal-LM rows (``input_ids``, ``labels``)."""
    ids = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    labels = [np.asarray(x, dtype=np.int64) for x in batch["labels"]]
    rows = [np.asarray(x) for x in batch.get("_row", np.arange(len(ids)))]
    out: dict[str, list[Any]] = {
        "input_ids": [], "labels": [], "position_ids": [], "seq_lens": [], "_rows": []
    }  # fmt: skip
    for group in best_fit_decreasing([len(x) for x in ids], max_length):
        group = sorted(group)  # keep file order inside a pack (stable, reproducible)
        lab = []
        for i in group:
            seq = labels[i].copy()
            # The previous sequence's last token must not learn to predict this one's first.
            seq[0] = IGNORE_INDEX
            lab.append(seq)
        out["input_ids"].append(np.concatenate([ids[i] for i in group]))
        out["labels"].append(np.concatenate(lab))
        out["position_ids"].append(np.concatenate([np.arange(len(ids[i])) for i in group]))
        out["seq_lens"].append(np.asarray([len(ids[i]) for i in group], dtype=np.int64))
        out["_rows"].append(np.asarray([int(rows[i]) for i in group], dtype=np.int64))
    return out


def block_causal_mask(seq_lens: Sequence[Sequence[int]], length: int) -> Any:
    """Boolean ``[batch, 1, L, L]`` mask: causal within each packed sequence, nothing across
    sequences or into padding (padding rows attend to themselves so softmax stays finite)."""
    import torch

    mask = torch.zeros((len(seq_lens), 1, length, length), dtype=torch.bool)
    for b, lens in enumerate(seq_lens):
        start = 0
        for n in lens:
            n = int(n)
            mask[b, 0, start : start + n, start : start + n] = torch.tril(
                torch.ones((n, n), dtype=torch.bool)
            )
            start += n
        for p in range(start, length):
            mask[b, 0, p, p] = True
    return mask


def cu_seqlens(seq_lens: Sequence[Sequence[int]]) -> np.ndarray:
    """Cumulative sequence starts for flash attention's varlen kernel (batch flattened)."""
    flat = [int(n) for lens in seq_lens for n in lens]
    return np.concatenate([[0], np.cumsum(flat)]).astype(np.int32)


def packing_efficiency(seq_lens: Sequence[Sequence[int]], max_length: int) -> float:
    """Real tokens / slots over a set of packed rows."""
    used = sum(int(n) for lens in seq_lens for n in lens)
    return used / max(1, len(seq_lens) * max_length)
