"""Automatic prefix caching for the continuous-batching engine: the prompt KV of recent
requests is kept, and a new request whose prompt starts with a kept prompt's tokens (a shared
system prompt, the earlier turns of a chat, RAG instructions, a repeated prompt) reuses those
keys and values and prefills only the rest.

Why our own: vLLM's and SGLang's prefix caches live inside their paged KV pools, and
transformers has no prefix cache for ``DynamicCache`` batches; this one stores each kept
prompt's per-layer K/V as its own tensors, found through hashes of fixed-size token blocks (as
vLLM finds its blocks), evicted least recently used under a token budget.

Reuse is exact for causal LMs: a kept key was computed at the same position from the same
preceding tokens (rotary or absolute embeddings are applied before caching), and the engine
masks the padding between a reused prefix and the rest of its prompt. Entries are keyed by
adapter, since an adapter changes every layer's keys and values. No Ray here.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per decoder layer, (keys, values) of one prompt: ``[1, heads, tokens, head_dim]``."""


@dataclass(eq=False)
class _Entry:
    key: int
    adapter: str | None
    ids: tuple[int, ...]
    kv: KV
    hashes: list[int] = field(default_factory=list)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """Kept prompt K/V, found by token prefix (see the module docstring).

    ``block`` tokens per hashed block: a prompt is found through its whole blocks, then the
    match is extended token by token, so a hit reuses every common token; a prompt shorter
    than one block is never found (its prefill is cheap anyway)."""

    def __init__(self, block: int = 16) -> None:
        self.block = block
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._index: dict[int, dict[int, _Entry]] = {}  # block-chain hash → entries, oldest first
        # the hash of an entry's last whole block → entries: those that may be a prefix of a
        # prompt with that block hash
        self._tails: dict[int, dict[int, _Entry]] = {}
        self._keys = itertools.count(1)
        self.tokens = 0  # tokens held by all entries

    def __len__(self) -> int:
        return len(self._entries)

    def _chain(self, adapter: str | None, ids: Sequence[int]) -> list[int]:
        """Hash of each whole block together with everything before it."""
        out, h = [], hash(("prefix", adapter))
        for start in range(0, len(ids) - self.block + 1, self.block):
            h = hash((h, tuple(ids[start : start + self.block])))
            out.append(h)
        return out

    def lookup(self, adapter: str | None, ids: Sequence[int]) -> tuple[int, KV | None]:
        """(reusable tokens, their per-layer K/V) for a prompt: at most ``len(ids) - 1``
        tokens, since the last prompt token must run to give the first new token's logits."""
        best = self._deepest(self._chain(adapter, ids))
        if best is None or best.adapter != adapter:  # (the adapter is hashed in: a collision)
            return 0, None
        n = min(_common(best.ids, ids), len(ids) - 1)
        if n <= 0:
            return 0, None
        self._entries.move_to_end(best.key)
        return n, [(k[:, :, :n], v[:, :, :n]) for k, v in best.kv]

    def _deepest(self, chain: list[int]) -> _Entry | None:
        """The most recently stored entry that shares the most whole blocks of ``chain``
        (not always the longest match: another entry may share up to a block's tokens more;
        comparing every entry under a shared system prompt would cost more than it saves)."""
        best = None
        for h in chain:
            found = self._index.get(h)
            if not found:
                break
            best = next(reversed(found.values()))
        return best

    def store(self, adapter: str | None, ids: Sequence[int], kv: KV, max_tokens: int) -> None:
        """Keep a copy of a prompt's K/V, evicting the least recently used entries past
        ``max_tokens``. An entry that is a prefix of this prompt is dropped, and a prompt
        within a kept one is not stored: the longer one serves the lookups of both."""
        ids = tuple(ids)
        if len(ids) < self.block or len(ids) > max_tokens:
            return
        hashes = self._chain(adapter, ids)
        longer = self._deepest(hashes)
        if longer is not None and longer.adapter == adapter and longer.ids[: len(ids)] == ids:
            self._entries.move_to_end(longer.key)  # kept already, or within a longer prompt
            return
        for h in hashes:
            for entry in list(self._tails.get(h, {}).values()):
                if entry.adapter == adapter and ids[: len(entry.ids)] == entry.ids:
                    self._remove(entry)
        while self._entries and self.tokens + len(ids) > max_tokens:
            self._remove(next(iter(self._entries.values())))
        kv = [(k.clone(), v.clone()) for k, v in kv]  # own memory, not a view of a batch
        entry = _Entry(next(self._keys), adapter, ids, kv, hashes)
        self._entries[entry.key] = entry
        for h in hashes:
            self._index.setdefault(h, {})[entry.key] = entry
        self._tails.setdefault(hashes[-1], {})[entry.key] = entry
        self.tokens += len(ids)

    def forget(self, adapter: str | None = None, everything: bool = False) -> None:
        """Drop an adapter's entries (it was unloaded), or all of them."""
        for entry in list(self._entries.values()):
            if everything or entry.adapter == adapter:
                self._remove(entry)

    def shrink(self, max_tokens: int) -> None:
        """Evict least recently used entries until at most ``max_tokens`` are held."""
        while self._entries and self.tokens > max_tokens:
            self._remove(next(iter(self._entries.values())))

    def _remove(self, entry: _Entry) -> None:
        del self._entries[entry.key]
        for table, keys in ((self._index, entry.hashes), (self._tails, entry.hashes[-1:])):
            for h in keys:
                found = table.get(h)
                if found is not None:
                    found.pop(entry.key, None)
                    if not found:
                        del table[h]
        self.tokens -= len(entry.ids)
