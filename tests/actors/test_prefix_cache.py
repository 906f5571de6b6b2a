"""Prefix caching and packed prefill in the continuous-batching engine: the prefix store finds
the longest kept prompt start, keeps adapters apart, evicts under its budget; the engine's
greedy output stays equal to ``model.generate`` when prompts reuse kept K/V and when newcomers
are prefilled packed into one row, for a rotary llama and a GPT-2 with learned absolute
positions (where a wrong position or a leaked neighbour changes the text)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from actors.engine import ContinuousBatchingEngine, EngineLimits, wait_result
from actors.generation import SamplingParams
from actors.prefix_cache import PrefixCache
from tests.actors.test_engine import NEW, Recorder, _gpt2, _llama, reference


def _kv(ids: list[int], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stand-in K/V whose columns hold the token ids (so slices can be checked)."""
    col = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1)
    return [(col + layer, -col - layer) for layer in range(layers)]


def test_lookup_finds_the_longest_kept_start_and_leaves_one_token_to_run():
    cache = PrefixCache(block=4)
    system = list(range(100, 110))
    cache.store(None, [*system, 1, 2, 3], _kv([*system, 1, 2, 3]), max_tokens=1000)
    n, kv = cache.lookup(None, [*system, 1, 2, 9, 9])
    assert n == len(system) + 2
    assert kv is not None and kv[1][0].flatten().tolist() == [t + 1 for t in [*system, 1, 2]]
    # the very same prompt: all but its last token (which must run for the next logits)
    assert cache.lookup(None, [*system, 1, 2, 3])[0] == len(system) + 2
    assert cache.lookup(None, [7, *system])[0] == 0  # a different first block
    assert cache.lookup(None, system[:3])[0] == 0  # shorter than a block: never found
    assert cache.lookup("style-a", [*system, 1, 2, 3])[0] == 0  # another adapter's K/V


def test_store_keeps_one_entry_per_conversation_and_evicts_least_recently_used():
    cache = PrefixCache(block=4)
    turn1 = list(range(20))
    turn2 = [*turn1, *range(50, 60)]
    cache.store(None, turn1, _kv(turn1), max_tokens=64)
    cache.store(None, turn2, _kv(turn2), max_tokens=64)
    assert len(cache) == 1 and cache.tokens == len(turn2)  # turn 1 is within turn 2
    cache.store(None, turn1, _kv(turn1), max_tokens=64)
    assert len(cache) == 1  # already within a kept prompt: not stored twice
    assert cache.lookup(None, [*turn1, 99])[0] == len(turn1)  # served by turn 2's entry
    other = list(range(200, 230))
    cache.store(None, other, _kv(other), max_tokens=64)
    assert cache.tokens == len(turn2) + len(other)
    cache.lookup(None, [*turn2, 1])  # turn 2 used: `other` is now the least recent
    third = list(range(300, 320))
    cache.store(None, third, _kv(third), max_tokens=64)
    assert cache.tokens <= 64
    assert cache.lookup(None, [*other, 1])[0] == 0  # evicted
    assert cache.lookup(None, [*turn2, 1])[0] == len(turn2)
    cache.store("a", other, _kv(other), max_tokens=100)
    cache.forget("a")
    assert cache.lookup("a", [*other, 1])[0] == 0
    cache.shrink(0)
    assert len(cache) == 0 and cache.tokens == 0


POSITION_SCALE = 3.0
SYSTEM = "You are a careful assistant. Answer in one short sentence. "
QUESTIONS = ["What is 12 times 7?", "Explain why the sky looks blue on a clear summer afternoon.",
             "Name a river.", "Say hello.", "Spell cat."]  # fmt: skip


def _burst(engine: ContinuousBatchingEngine, prompts: list[str]) -> list[list[int]]:
    """Submit every prompt while the engine can neither admit nor step, so that all are
    prefilled in one step; their greedy token ids."""
    recs = [Recorder() for _ in prompts]
    with engine.lock, engine._cond:
        for prompt, rec in zip(prompts, recs, strict=True):
            engine.submit(prompt, SamplingParams(max_new_tokens=NEW), None, rec)
    return [rec.result().token_ids for rec in recs]


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reused_prefixes_and_packed_prefill_keep_greedy_output_exact(kind, packing):
    """A system prompt shared by different questions, and repeated prompts, prefilled in
    bursts that mix reused and fresh prompts: each output equals ``generate`` alone."""
    model, tok = _llama() if kind == "llama" else _gpt2()
    if kind == "gpt2":  # positions as strong as tokens: a position off by one shows
        with torch.no_grad():
            model.transformer.wpe.weight.mul_(POSITION_SCALE)
    engine = ContinuousBatchingEngine(model, tok)
    engine.packing = packing
    prompts = [SYSTEM + q for q in QUESTIONS]
    want = {p: reference(model, tok, p) for p in [*prompts, *QUESTIONS]}
    assert len({tuple(ids) for ids in want.values()}) > len(want) // 2  # the text matters
    try:
        first = _burst(engine, [prompts[0], *QUESTIONS[:3]])  # nothing kept yet
        second = _burst(engine, [*prompts, *QUESTIONS])  # reuses, partly and wholly
        for prompt, ids in zip([prompts[0], *QUESTIONS[:3], *prompts, *QUESTIONS],
                               [*first, *second], strict=True):  # fmt: skip
            assert ids == want[prompt][: len(ids)], prompt
            assert len(ids) == NEW or tok.eos_token_id in reference(model, tok, prompt, NEW + 1)
        stats = engine.stats()

        def size(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        system = size(SYSTEM)
        # the second burst's system prompts reuse the first one's (at least the system
        # prompt); a repeated question reuses all but one token if it is a block long
        assert engine.prefix is not None
        repeats = [q for q in QUESTIONS[:3] if size(q) >= engine.prefix.block]
        assert repeats, "no question is long enough to be kept"
        assert stats["prefix_hits"] == len(prompts) + len(repeats), stats
        whole = sum(size(q) - 1 for q in repeats) + size(prompts[0]) - 1
        assert stats["prefix_tokens"] >= whole + (len(prompts) - 1) * (system - 1), stats
        # each burst ran in one prefill: packed (the second with reused K/V) or padded
        assert stats["prefill_batch_sizes"] == {4: 1, 10: 1}, stats
        assert stats.get("packed_prefills", 0) == (2 if packing else 0), stats
    finally:
        engine.close()


def test_prefix_cache_off_and_budget():
    model, tok = _llama()
    prompt = SYSTEM + QUESTIONS[0]
    size = len(tok(prompt, add_special_tokens=False)["input_ids"])
    off = ContinuousBatchingEngine(model, tok, EngineLimits(prefix_cache_tokens=0))
    small = ContinuousBatchingEngine(model, tok, EngineLimits(prefix_cache_tokens=size + 5))
    try:
        for engine in (off, small):
            for q in (prompt, prompt, SYSTEM + QUESTIONS[1]):
                done = wait_result(engine, q, SamplingParams(max_new_tokens=4))
                assert done.token_ids == reference(model, tok, q, 4)[: len(done.token_ids)]
        assert off.stats()["prefix_hits"] == 0 and off.stats()["prefix_cache"]["entries"] == 0
        stats = small.stats()
        assert stats["prefix_hits"] == 2, stats  # the repeat, and the shared system prompt
        assert stats["prefix_cache"]["tokens"] <= size + 5, stats  # one prompt fits at a time
        # lowering the budget (hot config) empties the store at the next prefill
        small.limits = EngineLimits(prefix_cache_tokens=0)
        wait_result(small, prompt, SamplingParams(max_new_tokens=2))
        assert small.stats()["prefix_cache"]["entries"] == 0
    finally:
        off.close()
        small.close()


def test_forget_adapter_drops_only_its_kept_prompts(tmp_path: Any):
    from peft import LoraConfig, get_peft_model

    model, tok = _llama()
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    served = get_peft_model(model, config, adapter_name="style").eval()
    engine = ContinuousBatchingEngine(served, tok)
    prompt = SYSTEM + QUESTIONS[0]
    params = SamplingParams(max_new_tokens=6)
    try:
        base, styled = (wait_result(engine, prompt, params, a) for a in (None, "style"))
        assert engine.stats()["prefix_cache"]["entries"] == 2  # one per adapter
        assert engine.stats()["prefix_hits"] == 0  # the base's K/V never serve the adapter
        again = wait_result(engine, prompt, params, "style")
        assert engine.stats()["prefix_hits"] == 1
        assert again.token_ids == styled.token_ids != base.token_ids
        engine.forget_adapter("style")
        assert engine.stats()["prefix_cache"]["entries"] == 1
        assert engine.prefix is not None
        assert engine.prefix.lookup(None, tok(prompt, add_special_tokens=False)["input_ids"])[0]
    finally:
        engine.close()


def test_packing_is_chosen_by_estimated_cost():
    """Packed when padding would dominate, padded when the packed row's dense attention over
    long reused prefixes would; never across adapters, nor when switched off."""
    from actors.engine import _Seq

    model, tok = _llama()
    engine = ContinuousBatchingEngine(model, tok)
    params = SamplingParams(max_new_tokens=4)
    try:

        def seqs(lengths: list[int], adapter: str | None = None) -> list[Any]:
            return [_Seq(i, [5] * n, params, adapter, Recorder(), None)
                    for i, n in enumerate(lengths)]  # fmt: skip

        varied = seqs([4, 30, 6, 9, 5, 7, 8, 4])
        none = [(0, None)] * len(varied)
        assert engine.packing is None  # SDPA: the engine decides
        assert engine._pack(varied, none)  # 73 tokens run packed against 8 x 30 padded
        long_shared = seqs([2000 + i for i in range(16)])
        reused = [(1990, None)] * 16
        # packed: 280 tokens each attending 32k columns; padded: 16 x 25 attending 2k
        assert not engine._pack(long_shared, reused)
        assert not engine._pack(seqs([4, 30]) + seqs([5], "style"), [(0, None)] * 3)
        engine.packing = False
        assert not engine._pack(varied, none)
        engine.packing = True
        assert engine._pack(long_shared, reused)
    finally:
        engine.close()


def test_models_whose_masks_count_columns_get_neither_reuse_nor_packing():
    """Sliding windows, chunked attention, other layer kinds and ALiBi place attention by
    cache columns or by the mask, which a reused prefix's hole or a packed row would shift:
    such a model keeps plain left-padded prefills, and its output stays that of generate."""
    import transformers

    from actors.engine import _plain_attention

    assert _plain_attention(transformers.LlamaConfig())
    assert not _plain_attention(transformers.MistralConfig(sliding_window=20))
    assert not _plain_attention(transformers.FalconConfig(alibi=True))
    assert not _plain_attention(transformers.BloomConfig())
    gemma = transformers.Gemma2Config()
    assert "sliding_attention" in gemma.layer_types and not _plain_attention(gemma)

    _, tok = _llama()
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=20,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad():  # wider weights: attention that reaches past the window shows
        for weight in model.parameters():
            weight.mul_(4.0)
    engine = ContinuousBatchingEngine(model, tok)
    try:
        engine.packing = True  # asking cannot make it pack
        prompts = [SYSTEM + QUESTIONS[0], SYSTEM + QUESTIONS[3], QUESTIONS[1]]
        _burst(engine, prompts[:1])
        for prompt, ids in zip(prompts, _burst(engine, prompts), strict=True):
            assert ids == reference(model, tok, prompt)[: len(ids)], prompt
        assert engine.prefix is None and "packed_prefills" not in engine.stats()
    finally:
        engine.close()


def test_a_forward_that_rejects_the_block_mask_falls_back_to_padded_rows(caplog):
    model, tok = _llama()
    engine = ContinuousBatchingEngine(model, tok)
    engine.packing = True

    def reject(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("too many values to unpack")  # what an ALiBi forward raises

    engine._run_packed = reject  # type: ignore[method-assign]
    prompts = [SYSTEM + q for q in QUESTIONS[:3]]
    try:
        with caplog.at_level("WARNING", logger="actors.engine"):
            out = _burst(engine, prompts)
        for prompt, ids in zip(prompts, out, strict=True):
            assert ids == reference(model, tok, prompt)[: len(ids)], prompt
        assert engine.stats()["prefill_batch_sizes"] == {3: 1}  # one padded forward, no retries
        assert engine._packable is False
        assert "packed prefill failed" in caplog.text
    finally:
        engine.close()
