"""The continuous-batching engine (no Ray): greedy output equals ``model.generate`` token for
token alone and inside a busy batch that requests join and leave mid-decode (a rotary llama, a
GPT-2 with learned positions, where an off-by-one position changes the text, and T5-family
encoder-decoders with a pronounced relative position bias), mixed LoRA adapters in one batch,
per-request seeds, stop sequences, bounded queue and KV budget, cancellation, a failing prompt
that fails alone, BART-family encoder-decoders through per-row decoder positions (shown to be
needed), and the refusal of families the engine has no positions for."""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from actors.engine import ContinuousBatchingEngine, EngineLimits, EngineOverloaded, wait_result
from actors.generation import Completion, SamplingParams, stop_token_ids
from tests.conftest import tiny_gpt2

PROMPTS = [
    "Write a short note about the train timetable.",
    "Question: what is 12 times 7? Answer:",
    "Paris is the capital of France; Berlin is",
    "The quick brown fox",
    "def add(a, b):",
    "You are a helpful assistant. Please answer briefly and politely.",
]
NEW = 24


def _llama() -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from actors.tiny import tiny_model_path

    source = tiny_model_path("tiny:llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).eval()
    return model, AutoTokenizer.from_pretrained(source)


def _gpt2(n_positions: int = 128) -> tuple[Any, Any]:
    return tiny_gpt2(n_positions)


def _seq2seq(kind: str = "t5", position_scale: float = 30.0) -> tuple[Any, Any]:
    """A tiny random encoder-decoder of ``kind`` (T5-family configs, the project's tiny
    tokenizer; T5 weights drawn 5x wider than T5's init, which with 2 layers decodes one
    token over and over; or ``actors.tiny.tiny_bart`` for a BART-family ``kind``) with its
    position weights scaled by ``position_scale``."""
    import transformers
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from actors.engine import ABSOLUTE_DECODERS
    from actors.tiny import tiny_bart, tiny_model_path

    if kind in ABSOLUTE_DECODERS:
        return tiny_bart(kind, position_scale)
    tok = AutoTokenizer.from_pretrained(tiny_model_path("tiny:t5"))
    classes = {
        "t5": transformers.T5Config,
        "mt5": transformers.MT5Config,
        "umt5": transformers.UMT5Config,
        "longt5": transformers.LongT5Config,
    }
    config = classes[kind](
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, initializer_factor=5.0, vocab_size=len(tok),
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "relative_attention_bias" in name:
                weight.mul_(position_scale)
    return model, tok


@pytest.fixture(scope="module", params=["llama", "gpt2", "t5", "bart"])
def lm(request) -> tuple[Any, Any]:
    return {"llama": _llama, "gpt2": _gpt2, "t5": _seq2seq,
            "bart": lambda: _seq2seq("bart", position_scale=10.0)}[request.param]()  # fmt: skip


def reference(
    model: Any, tok: Any, prompt: str, new: int = NEW, sampled: SamplingParams | None = None
) -> list[int]:
    """``model.generate`` alone: the generated ids up to (without) EOS. Greedy, or with
    ``sampled``'s settings after ``torch.manual_seed`` of its seed."""
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    settings: dict[str, Any] = {"max_new_tokens": new, "do_sample": False}
    if sampled is not None:
        torch.manual_seed(sampled.seed)
        settings = {"max_new_tokens": sampled.max_new_tokens, "do_sample": True,
                    "temperature": sampled.temperature, "top_k": sampled.top_k,
                    "top_p": sampled.top_p}  # fmt: skip
    with torch.no_grad():
        out = model.generate(
            **enc, **settings, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
        )
    # an encoder-decoder's output starts at its decoder start token, a causal LM's at the prompt
    seq2seq = model.config.is_encoder_decoder
    ids = out[0, 1 if seq2seq else enc["input_ids"].shape[1] :].tolist()
    return ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids


class Recorder:
    """A sink that keeps the pieces and the completion, and can run a callback on the first
    piece (to make another request join while this one is decoding)."""

    def __init__(self, on_first: Any = None) -> None:
        self.pieces: list[str] = []
        self.done: Completion | None = None
        self.error: Exception | None = None
        self.finished = threading.Event()
        self.on_first = on_first
        self.generated_before_first: int | None = None

    def __call__(self, kind: str, payload: Any) -> None:
        if kind == "text":
            self.pieces.append(payload)
            if self.on_first is not None:
                callback, self.on_first = self.on_first, None
                callback()
        else:
            self.done = payload if kind == "done" else None
            self.error = payload if kind == "error" else None
            self.finished.set()

    def result(self, timeout_s: float = 120.0) -> Completion:
        assert self.finished.wait(timeout_s), "no completion in time"
        if self.error is not None:
            raise self.error
        assert self.done is not None
        return self.done


def test_greedy_alone_equals_generate(lm):
    model, tok = lm
    engine = ContinuousBatchingEngine(model, tok)
    try:
        for prompt in PROMPTS:
            done = wait_result(engine, prompt, SamplingParams(max_new_tokens=NEW))
            assert done.token_ids == reference(model, tok, prompt)[: len(done.token_ids)]
            assert done.text == tok.decode(done.token_ids, skip_special_tokens=True)
            assert done.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    finally:
        engine.close()


def test_engine_thread_cpu_is_read_from_outside_it(lm):
    """``stats()["thread_cpu_s"]`` is the engine thread's own CPU clock: 0.0 before it starts,
    at least what that thread read on its clock while delivering a completion, never going
    back, and its total once closed (not lost)."""
    model, tok = lm
    engine = ContinuousBatchingEngine(model, tok)
    seen: list[float] = []
    try:
        assert engine.stats()["thread_cpu_s"] == 0.0
        if not hasattr(time, "pthread_getcpuclockid"):
            pytest.skip("no per-thread CPU clock to read from another thread here")
        rec = Recorder()

        def sink(kind: str, payload: Any) -> None:  # runs on the engine thread
            if kind != "text":
                seen.extend((time.thread_time(), time.perf_counter()))
            rec(kind, payload)

        engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=NEW), None, sink)
        rec.result()
        first = engine.stats()["thread_cpu_s"]
        # that thread's clock: no less than it read, no more than the wall time since allows
        assert seen[0] > 0 and seen[0] <= first <= seen[0] + time.perf_counter() - seen[1]
        assert engine.stats()["thread_cpu_s"] >= first
    finally:
        engine.close()
    total = engine.stats()["thread_cpu_s"]
    assert total >= first and engine.stats()["thread_cpu_s"] == total


def test_pieces_are_those_of_transformers_text_streamer(lm):
    """The engine hands text over where transformers' ``TextIteratorStreamer`` does (the same
    pieces, in order, for the same greedy tokens), so a stream is as smooth as the library's
    and its first piece comes no later."""
    from transformers import TextIteratorStreamer

    model, tok = lm
    engine = ContinuousBatchingEngine(model, tok)
    try:
        for prompt in PROMPTS:
            rec = Recorder()
            engine.submit(prompt, SamplingParams(max_new_tokens=NEW), None, rec)
            done = rec.result()
            enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            with torch.no_grad():
                model.generate(
                    **enc,
                    max_new_tokens=NEW,
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            want = [piece for piece in streamer if piece]
            # The same pieces but the last: at its last token the engine sends all that is
            # left as one piece, where the streamer hands that token's piece over and flushes
            # the rest at its end.
            assert rec.pieces[:-1] == want[: len(rec.pieces) - 1], prompt
            assert "".join(rec.pieces) == "".join(want) == done.text
    finally:
        engine.close()


def test_running_text_is_decoded_token_by_token_and_still_joins_to_the_whole():
    """While a request runs, its text is decoded one new token at a time (the tokenizer's
    ``DecodeStream``), not whole at every step (O(length²) on the engine thread): a request
    costs one whole-text ``decode``, at its end; its pieces join to that text, which is
    ``generate``'s ids decoded. A tokenizer whose ``decode`` does more than its streaming
    decoder (here a clean-up of spaces before full stops) is decoded whole at every step
    instead, with the same results."""
    model, tok = _llama()
    plain = tok.decode
    for cleaned in (False, True):
        calls = Counter()

        def decode(*args: Any, cleaned: bool = cleaned, calls: Counter = calls,
                   **kwargs: Any) -> str:  # fmt: skip
            calls[threading.current_thread().name] += 1
            text = plain(*args, **kwargs)
            return text.replace(" .", ".") if cleaned else text

        tok.decode = decode
        engine = ContinuousBatchingEngine(model, tok)  # its check of the tokenizer runs here
        calls.clear()
        try:
            for prompt in PROMPTS[:3]:
                rec = Recorder()
                engine.submit(prompt, SamplingParams(max_new_tokens=NEW), None, rec)
                done = rec.result()
                want = tok.decode(reference(model, tok, prompt), skip_special_tokens=True)
                assert done.text == want == "".join(rec.pieces), (cleaned, prompt)
        finally:
            engine.close()
        on_engine = sum(n for name, n in calls.items() if name != "MainThread")
        if cleaned:
            assert on_engine >= 3 * (NEW - 1), calls
        else:
            assert on_engine == 3, calls


def _scripted(
    model: Any, tok: Any, script: list[int], params: SamplingParams, streaming: bool
) -> tuple[Completion, Recorder, bool]:
    """One request on a fresh engine whose model "picks" the tokens of ``script`` in turn,
    its text streamed by the tokenizer's streaming decoder (which its check must let through)
    or decoded whole (``streaming=False``, the engine's path for tokenizers it cannot stream)
    → (the completion, its recorder, whether it streamed to the end, falling back for
    neither the tokenizer nor this request)."""
    engine = ContinuousBatchingEngine(model, tok)
    assert engine._streaming is not None
    if not streaming:
        engine._streaming = None
    picks = iter(script)
    engine._choose = lambda seqs, logits: [next(picks) for _ in seqs]
    rec = Recorder()
    try:
        engine.submit("Hello", params, None, rec)
        done = rec.result()
        return done, rec, engine._streaming is not None and not engine.counters["stream_fallbacks"]
    finally:
        engine.close()


def test_a_stop_string_in_a_held_back_piece_ends_the_request_where_whole_texts_would():
    """A token that ends inside a character is held back from the running text until the
    character is complete; a stop string in that piece still ends the request at that token
    and is cut from its text, as decoding whole texts does (the engine's path for tokenizers
    it cannot stream, the reference here): same tokens, text and finish reason, and no part
    of the stop string streamed. The tokens are scripted, to place that piece."""
    model, tok = _llama()
    body = tok(" The quick brown fox", add_special_tokens=False)["input_ids"]
    # a token that ends inside a character after a space, and one that completes it
    held = next(i for i in range(len(tok))
                if re.fullmatch(r" [^\ufffd]*\ufffd", tok.decode([i])))  # fmt: skip
    done_char = next(i for i in range(len(tok)) if "\ufffd" not in tok.decode([held, i]))
    eos = tok.eos_token_id
    cases = [  # (tokens the model picks, max_new_tokens)
        ([*body, held], len(body) + 1),  # the budget ends at the held piece
        ([*body, held, eos], 50),  # EOS right after it
        ([*body, held, done_char, *body], 50),  # the character completed after it
        ([*body, done_char, held, done_char], len(body) + 3),  # no stop string
    ]
    for script, budget in cases:
        got = []
        for streaming in (True, False):
            params = SamplingParams(max_new_tokens=budget, stop=("fox ",))
            done, rec, _ = _scripted(model, tok, script, params, streaming)
            assert "".join(rec.pieces) == done.text and "fox " not in done.text
            got.append((done.text, done.finish_reason, done.completion_tokens, done.token_ids))
        assert got[0] == got[1], (script, got)


def test_a_stream_that_disagrees_with_decode_is_dropped_for_whole_texts(caplog):
    """If token-by-token decoding ever disagrees with the whole text's ``decode`` (a tokenizer
    the engine's check let through), the completion still carries the whole text, the engine
    says so once and decodes whole texts from then on."""
    from tokenizers.decoders import DecodeStream

    class Garbled:
        """A streaming decoder that adds a character to every piece."""

        def __init__(self, skip_special_tokens: bool) -> None:
            self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)

        def step(self, tokenizer: Any, ids: Any) -> str | None:
            piece = self.stream.step(tokenizer, ids)
            return None if piece is None else "#" + piece

    model, tok = _llama()
    engine = ContinuousBatchingEngine(model, tok)
    engine._streaming = Garbled
    try:
        first = wait_result(engine, PROMPTS[0], SamplingParams(max_new_tokens=NEW))
        assert engine._streaming is None
        assert "decodes token by token differently" in caplog.text
        second = Recorder()
        engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=NEW), None, second)
        for prompt, done in ((PROMPTS[0], first), (PROMPTS[1], second.result())):
            want = tok.decode(reference(model, tok, prompt), skip_special_tokens=True)
            assert done.text == want and "#" not in want
        assert "".join(second.pieces) == second.done.text
    finally:
        engine.close()


def test_joins_mid_decode_keep_every_greedy_output_exact(lm):
    """Requests join a running batch at different steps (each one's first piece submits the
    next), with different lengths and a sampled neighbour; each greedy output still equals
    ``generate`` alone, and the decode batch really held several sequences at once."""
    model, tok = lm
    engine = ContinuousBatchingEngine(model, tok)
    recorders: list[Recorder] = []
    lengths = [NEW, 6, NEW, 12, NEW, 3]

    def chain(i: int) -> Any:
        def submit() -> None:
            rec = Recorder(on_first=chain(i + 1) if i + 1 < len(PROMPTS) else None)
            recorders.append(rec)
            engine.submit(PROMPTS[i], SamplingParams(max_new_tokens=lengths[i]), None, rec)
            # a sampled request in the same batch must not disturb the greedy ones
            sampled = SamplingParams(max_new_tokens=5, temperature=1.0, seed=i)
            engine.submit(PROMPTS[-1 - i], sampled, None, Recorder())

        return submit

    try:
        chain(0)()
        deadline = time.monotonic() + 120
        while len(recorders) < len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.01)
        for i, rec in enumerate(recorders):
            done = rec.result()
            want = reference(model, tok, PROMPTS[i], lengths[i])
            assert done.token_ids == want[: len(done.token_ids)], PROMPTS[i]
            assert "".join(rec.pieces) == done.text
            if done.finish_reason == "length":
                assert done.completion_tokens == lengths[i]
        stats = engine.stats()
        assert max(stats["decode_batch_sizes"]) >= 3, stats
        # the engine thread's time is accounted: it prefilled, decoded and waited for work
        assert stats["seconds"]["prefill"] > 0 and stats["seconds"]["decode"] > 0, stats
        assert stats["seconds"]["idle"] >= 0, stats
        # every request's wait for its prefill and for its first token is summed
        latency = stats["latency_s"]
        assert latency["requests"] == stats["submitted"], stats
        assert 0 <= latency["waiting"] < latency["first_token"], stats
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(kind):
    model, tok = _llama() if kind == "llama" else _seq2seq()
    engine = ContinuousBatchingEngine(model, tok)
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=11)
    try:
        alone = wait_result(engine, PROMPTS[0], params)
        others = [Recorder() for _ in range(4)]
        for i, rec in enumerate(others):
            engine.submit(PROMPTS[i + 1], SamplingParams(max_new_tokens=20, temperature=1.3,
                                                         seed=100 + i), None, rec)  # fmt: skip
        busy = wait_result(engine, PROMPTS[0], params)
        for rec in others:
            rec.result()
        assert busy.token_ids == alone.token_ids
        # the very draw generate makes with that seed (the engine's generator per request)
        assert alone.token_ids == reference(model, tok, PROMPTS[0], sampled=params)
        unseeded = {tuple(wait_result(engine, PROMPTS[0],
                                      SamplingParams(max_new_tokens=16, temperature=1.5)
                                      ).token_ids) for _ in range(3)}  # fmt: skip
        assert len(unseeded) > 1  # no seed: a fresh draw each time
    finally:
        engine.close()


def test_stop_sequence_is_trimmed_and_never_streamed(lm):
    model, tok = lm
    engine = ContinuousBatchingEngine(model, tok)
    try:
        full = wait_result(engine, PROMPTS[0], SamplingParams(max_new_tokens=NEW)).text
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        if not stop.strip():
            pytest.skip(f"no usable stop string in {full!r}")
        rec = Recorder()
        engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=NEW, stop=(stop,)), None, rec)
        done = rec.result()
        assert done.text == full[: full.index(stop)]
        assert done.finish_reason == "stop"
        assert "".join(rec.pieces) == done.text
    finally:
        engine.close()


def _two_adapters(tmp_path: Path, kind: str) -> tuple[Any, Any, Any]:
    """A tiny ``kind`` model saved under ``tmp_path/base``, with random LoRA adapters ``a``
    (seed 1) and ``b`` (seed 2) saved beside it → (the base with both loaded as serving loads
    them, its tokenizer, ``alone(adapter, prompt)``: PEFT's own ``generate`` with only that
    adapter, or none, active)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model, tok = _llama() if kind == "llama" else _seq2seq(kind, position_scale=10.0)
    auto = AutoModelForCausalLM if kind == "llama" else AutoModelForSeq2SeqLM
    targets = ["q", "v"] if kind == "t5" else ["q_proj", "v_proj"]
    model.save_pretrained(tmp_path / "base")
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        fresh = auto.from_pretrained(tmp_path / "base")
        # the task type makes PEFT wrap the model as serving does (PeftModelForCausalLM or
        # PeftModelForSeq2SeqLM, whose forward passes its own arguments on)
        task_type = "CAUSAL_LM" if kind == "llama" else "SEQ_2_SEQ_LM"
        config = LoraConfig(r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False,
                            task_type=task_type)  # fmt: skip
        get_peft_model(fresh, config).save_pretrained(tmp_path / name)

    def alone(adapter: str | None, prompt: str) -> list[int]:
        base = auto.from_pretrained(tmp_path / "base").eval()
        if adapter is None:
            return reference(base, tok, prompt)
        return reference(PeftModel.from_pretrained(base, tmp_path / adapter).eval(), tok, prompt)

    served = auto.from_pretrained(tmp_path / "base").eval()
    served = PeftModel.from_pretrained(served, tmp_path / "a", adapter_name="a")
    served.load_adapter(tmp_path / "b", adapter_name="b")
    return served.eval(), tok, alone


@pytest.mark.parametrize("kind", ["llama", "t5", "bart"])
def test_mixed_adapters_share_a_batch_and_each_equals_peft(tmp_path, kind):
    """Base, adapter a and adapter b in one running batch (``actors.adapter_rows``): each
    output equals PEFT's own ``generate`` with only that adapter active."""
    served, tok, alone = _two_adapters(tmp_path, kind)
    engine = ContinuousBatchingEngine(served, tok)
    try:
        recs = {name: Recorder() for name in (None, "a", "b")}
        # holding the lock keeps the first step waiting until all three are queued: they
        # decode together (prefilled in one group, or the first alone and two after it)
        with engine.lock:
            for name, rec in recs.items():
                engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=NEW), name, rec)
        outputs = {name: rec.result().token_ids for name, rec in recs.items()}
        assert max(engine.stats()["decode_batch_sizes"]) == 3
        for name, ids in outputs.items():
            assert ids == alone(name, PROMPTS[0])[: len(ids)], name
        assert outputs["a"] != outputs["b"] != outputs[None]
        if kind == "llama":  # again: each adapter's kept prompt K/V serve its own repeat
            again = {name: Recorder() for name in (None, "a", "b")}
            with engine.lock:
                for name, rec in again.items():
                    engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=NEW), name, rec)
            assert {name: rec.result().token_ids for name, rec in again.items()} == outputs
            assert engine.stats()["prefix_hits"] == 3, engine.stats()
    finally:
        engine.close()


def test_prompts_of_different_adapters_prefill_packed_in_one_row(tmp_path):
    """Newcomers through the base, a and b run packed back to back in one row, each token
    through its own request's adapter: one packed prefill, and each output equals PEFT's own
    ``generate`` with only that adapter active."""
    served, tok, alone = _two_adapters(tmp_path, "llama")
    engine = ContinuousBatchingEngine(served, tok)
    engine.packing = True
    jobs = [(None, PROMPTS[1]), ("a", PROMPTS[2]), ("b", PROMPTS[3]), ("a", PROMPTS[4])]
    try:
        recs = [Recorder() for _ in jobs]
        with engine.lock:
            for (name, prompt), rec in zip(jobs, recs, strict=True):
                engine.submit(prompt, SamplingParams(max_new_tokens=NEW), name, rec)
        outputs = [rec.result().token_ids for rec in recs]
        stats = engine.stats()
        assert stats["packed_prefills"] == 1 and max(stats["decode_batch_sizes"]) == 4, stats
        for (name, prompt), ids in zip(jobs, outputs, strict=True):
            assert ids == alone(name, prompt)[: len(ids)], name
    finally:
        engine.close()


def test_a_failed_packed_prefill_across_adapters_stops_only_that_packing(tmp_path):
    """A packed row of several adapters that fails runs left-padded, exactly; those adapters
    stop packing together, and one adapter's newcomers still pack."""
    served, tok, alone = _two_adapters(tmp_path, "llama")
    engine = ContinuousBatchingEngine(served, tok)
    engine.packing = True
    rows = engine._adapter_rows_now()
    assert rows is not None and rows.packs(["a", "b"])

    def refuse(names: Any) -> Any:
        raise ValueError("this LoRA layer cannot take adapters per token")

    rows.packed = refuse  # type: ignore[method-assign]

    def burst(jobs: list[tuple[str | None, str]]) -> list[list[int]]:
        recs = [Recorder() for _ in jobs]
        with engine.lock:
            for (name, prompt), rec in zip(jobs, recs, strict=True):
                engine.submit(prompt, SamplingParams(max_new_tokens=NEW), name, rec)
        return [rec.result().token_ids for rec in recs]

    try:
        # (the engine may admit the first request before the others are queued)
        mixed = [("a", PROMPTS[1]), ("a", PROMPTS[5]), ("b", PROMPTS[2])]
        for (name, prompt), ids in zip(mixed, burst(mixed), strict=True):
            assert ids == alone(name, prompt)[: len(ids)], name
        assert not rows.packs(["a", "b"]) and engine._packable
        assert engine.stats().get("packed_prefills", 0) == 0
        burst([("a", PROMPTS[3]), ("a", PROMPTS[4]), ("a", PROMPTS[0])])
        assert engine.stats()["packed_prefills"] == 1
        # the last adapter unloaded: the runner lets the PEFT model (and its stacks) go
        with engine.lock:
            engine.model = served.unload()
        assert engine._adapter_rows_now() is None and engine._adapter_rows is None
        assert not rows._linears and not rows._stacks
    finally:
        engine.close()


def _staggered_joins(
    engine: ContinuousBatchingEngine, lengths: list[int] | list[tuple[str, SamplingParams]]
) -> list[Completion]:
    """Submit ``PROMPTS`` (cycled) with these token budgets, or these (prompt, params) jobs,
    each once the engine has taken a decode step since the previous one (or has nothing left
    to step), so every request joins a batch already running; their completions, in order."""
    jobs = [job if isinstance(job, tuple) else
            (PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=job))
            for i, job in enumerate(lengths)]  # fmt: skip
    recorders = [Recorder() for _ in jobs]
    for i, (prompt, params) in enumerate(jobs):
        steps = sum(engine.stats()["decode_batch_sizes"].values())
        engine.submit(prompt, params, None, recorders[i])
        deadline = time.monotonic() + 30
        while sum(engine.stats()["decode_batch_sizes"].values()) <= steps:
            if all(rec.finished.is_set() for rec in recorders[: i + 1]):
                break  # nothing left running to step
            assert time.monotonic() < deadline, "the engine took no decode step"
            time.sleep(0.001)
    return [rec.result() for rec in recorders]


@pytest.mark.parametrize("kind", ["mt5", "umt5", "longt5"])
def test_every_relative_position_encoder_decoder_joins_exactly(kind):
    """The other families ``RELATIVE_DECODERS`` admits (T5 itself runs every ``lm`` test):
    rows that joined at different steps each decode as ``generate`` alone."""
    from actors.engine import RELATIVE_DECODERS

    assert kind in RELATIVE_DECODERS
    model, tok = _seq2seq(kind)
    engine = ContinuousBatchingEngine(model, tok)
    lengths = [NEW, 6, NEW, 12, 3, 20, 9, NEW]
    try:
        for i, done in enumerate(_staggered_joins(engine, lengths)):
            want = reference(model, tok, PROMPTS[i % len(PROMPTS)], lengths[i])
            assert done.token_ids == want, (kind, i)
        assert max(engine.stats()["decode_batch_sizes"]) >= 3
    finally:
        engine.close()


def test_encoder_cache_shrinks_when_the_widest_prompt_leaves():
    """An encoder-decoder's cross-attention cache is as wide as its widest running prompt:
    when a long prompt's request ends, the batch's encoder columns drop to the next widest
    (memory follows what runs), and the request still running decodes on unchanged."""
    model, tok = _seq2seq()
    widths: list[int] = []
    # ``prepare`` runs before every step, after the rows that ended have left
    engine = ContinuousBatchingEngine(
        model, tok, prepare=lambda _: widths.append(engine.stats()["encoder_width"])
    )
    short, long = PROMPTS[3], " ".join(PROMPTS)
    n_short = len(tok(short, add_special_tokens=False)["input_ids"])
    n_long = len(tok(long, add_special_tokens=False)["input_ids"])
    try:
        keeps, leaves = Recorder(), Recorder()
        engine.submit(short, SamplingParams(max_new_tokens=NEW), None, keeps)
        engine.submit(long, SamplingParams(max_new_tokens=4), None, leaves)
        leaves.result()
        assert keeps.result().token_ids == reference(model, tok, short)
        assert n_long in widths, (n_short, n_long, widths)
        last_wide = max(i for i, w in enumerate(widths) if w == n_long)
        assert widths[last_wide + 1 :] and set(widths[last_wide + 1 :]) == {n_short}, widths
        assert engine.stats()["encoder_width"] == 0  # nothing runs, nothing is held
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["llama", "t5", "bart"])
def test_generation_config_settings_shape_scores_as_generate_shapes_them(kind):
    """What a model's generation_config sets for each step's scores (a repetition penalty, an
    n-gram ban, a minimum length, suppressed and banned tokens, a sequence bias on EOS; for an
    encoder-decoder also the encoder-side penalty and n-gram ban) goes through generate's own
    processors per request: greedy output equal to ``generate`` alone and with rows joining
    mid-decode at different budgets. Sampling settings beyond temperature / top-k / top-p
    (min-p, typical) make each sampled row use generate's warpers: a seeded request then
    samples what ``generate`` samples after ``torch.manual_seed`` of that seed, alone and in a
    busy batch. Decoding strategies the engine does not run are refused with the reason."""
    from actors.engine import engine_unsupported

    model, tok = {"llama": _llama, "t5": _seq2seq,
                  "bart": lambda: _seq2seq("bart", position_scale=10.0)}[kind]()  # fmt: skip
    lengths = [NEW, 12, 20, 16, NEW]
    plain = [reference(model, tok, PROMPTS[i], n) for i, n in enumerate(lengths)]
    common = [t for t, _ in Counter(t for ids in plain for t in ids).most_common(2)]
    settings = {
        "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 14,
        "suppress_tokens": [common[0]], "bad_words_ids": [[common[1]]],
        # an EOS made near certain: each text ends exactly where the minimum allows
        "sequence_bias": {(tok.eos_token_id,): 1000.0},
    }  # fmt: skip
    if model.config.is_encoder_decoder:
        settings.update(encoder_repetition_penalty=1.5, encoder_no_repeat_ngram_size=3)
    for key, value in settings.items():
        setattr(model.generation_config, key, value)
    wants = [reference(model, tok, PROMPTS[i], n) for i, n in enumerate(lengths)]
    assert sum(w != p for w, p in zip(wants, plain, strict=True)) >= 4  # the settings bite
    assert [len(w) for w in wants] == [min(14, n) for n in lengths]
    assert engine_unsupported(model) is None
    engine = ContinuousBatchingEngine(model, tok)
    try:
        assert not engine._own_warpers
        outputs = _staggered_joins(engine, lengths)
    finally:
        engine.close()
    assert [done.token_ids for done in outputs] == wants

    model.generation_config.min_p = 0.05
    model.generation_config.typical_p = 0.9
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    want = reference(model, tok, PROMPTS[0], sampled=params)
    engine = ContinuousBatchingEngine(model, tok)
    try:
        assert engine._own_warpers
        assert wait_result(engine, PROMPTS[0], params).token_ids == want
        others = [Recorder() for _ in range(3)]
        for i, rec in enumerate(others):
            engine.submit(PROMPTS[i + 1], SamplingParams(max_new_tokens=20, temperature=1.3,
                                                         seed=100 + i), None, rec)  # fmt: skip
        assert wait_result(engine, PROMPTS[0], params).token_ids == want
        for rec in others:
            rec.result()
    finally:
        engine.close()

    for key, value, named in (
        ("prompt_lookup_num_tokens", 3, "assisted generation (prompt_lookup_num_tokens=3)"),
        ("guidance_scale", 1.5, "guidance_scale=1.5"),
    ):
        setattr(model.generation_config, key, value)
        assert named in (engine_unsupported(model) or "")
        with pytest.raises(ValueError, match=re.escape(named)):
            ContinuousBatchingEngine(model, tok)
        setattr(model.generation_config, key, None)


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_configured_forced_first_and_last_tokens_are_applied_as_generate_applies_them(kind):
    """A generation_config's forced first token (mBART's and NLLB's target language; for a
    causal LM, only after a one-token prompt) and forced last token (BART's EOS at the
    request's budget) shape the engine's output as they shape ``generate``'s, alone and with
    rows joining mid-decode at different budgets."""
    from actors.engine import engine_unsupported

    model, tok = _llama() if kind == "llama" else _seq2seq(kind, position_scale=10.0)
    lengths = [NEW, 6, 12, 3, 20]
    plain = [reference(model, tok, PROMPTS[i], n) for i, n in enumerate(lengths)]
    model.generation_config.forced_eos_token_id = tok.eos_token_id
    forced_first = 42
    if kind == "bart":
        model.generation_config.forced_bos_token_id = forced_first
    wants = [reference(model, tok, PROMPTS[i], n) for i, n in enumerate(lengths)]
    assert wants != plain
    for want, n in zip(wants, lengths, strict=True):
        assert len(want) == n - 1  # the last token of each budget is the forced EOS
        assert kind != "bart" or want[0] == forced_first
    assert engine_unsupported(model) is None
    engine = ContinuousBatchingEngine(model, tok)
    try:
        outputs = _staggered_joins(engine, lengths)
    finally:
        engine.close()
    assert [done.token_ids for done in outputs] == wants
    assert {done.finish_reason for done in outputs} == {"stop"}


@pytest.mark.parametrize("kind", ["bart", "mbart", "marian", "pegasus", "m2m_100", "plbart", "mvp",
                                  "blenderbot", "blenderbot-small", "led",
                                  "bigbird_pegasus"])  # fmt: skip
def test_absolute_position_encoder_decoders_join_exactly_through_row_positions(kind, monkeypatch):
    """BART-family decoders number a step's positions from the batch's shared cache width:
    with the engine's per-row positions, rows that joined at different steps each decode as
    ``generate`` alone; with the hook switched off (the positions the model computes itself),
    some joined row decodes differently, so the hook is what makes them exact."""
    import actors.engine as engine_module
    from actors.engine import ABSOLUTE_DECODERS, engine_unsupported

    assert kind in ABSOLUTE_DECODERS
    # BlenderbotSmall adds its positions after the embedding's layer norm: at 10x they move
    # no joined row's text
    model, tok = _seq2seq(kind, position_scale=100.0 if kind == "blenderbot-small" else 10.0)
    assert engine_unsupported(model) is None
    lengths = [NEW, 6, NEW, 12, 3, 20]
    wants = [reference(model, tok, PROMPTS[i % len(PROMPTS)], n) for i, n in enumerate(lengths)]
    engine = ContinuousBatchingEngine(model, tok)
    try:
        outputs = _staggered_joins(engine, lengths)
        assert [done.token_ids for done in outputs] == wants
        assert max(engine.stats()["decode_batch_sizes"]) >= 3
    finally:
        engine.close()
    # the hook is gone with its engine
    assert not engine_module._position_module(model)._forward_hooks

    monkeypatch.setattr(engine_module._RowPositions, "_hook", lambda *args: None)
    engine = ContinuousBatchingEngine(model, tok)
    try:
        outputs = _staggered_joins(engine, lengths)
    finally:
        engine.close()
    wrong = [i for i, done in enumerate(outputs) if done.token_ids != wants[i]]
    assert wrong, f"every joined {kind} row decoded as alone without the row positions"


def test_row_positions_give_each_row_what_its_module_gives_it_alone():
    """The hook's output, row by row, is the position module's own output for that row's input
    and cache length alone — including M2M100's padding-aware positions, where a row feeding
    the pad token gets another embedding than its neighbour at the same step."""
    from actors.engine import _position_module, _RowPositions

    model, _ = _seq2seq("m2m_100")
    module = _position_module(model)
    hook = _RowPositions(module)
    token, pad = 7, model.config.pad_token_id
    ids = torch.tensor([[token], [pad], [token]])
    embeds = torch.zeros(3, 1, model.config.d_model)
    try:
        hook.rows = [3, 3, 9]
        out = module(ids, embeds, 11)  # the batch's shared cache length
        hook.rows = None
        for row, length in enumerate([3, 3, 9]):
            alone = module(ids[row : row + 1], embeds[row : row + 1], length)
            assert torch.equal(out[row], alone[0]), row
        assert not torch.equal(out[0], out[1])  # the pad row is numbered as padding
    finally:
        hook.handle.remove()


def test_prompts_past_an_absolute_encoders_positions_are_refused():
    """A prompt longer than a BART encoder's position table is refused at submit with the
    limit (its lookup would fail in prefill — on CUDA, for the whole batch)."""
    model, tok = _seq2seq("bart", position_scale=10.0)
    engine = ContinuousBatchingEngine(model, tok)
    try:
        with pytest.raises(ValueError, match="more than the model's 256 positions"):
            engine.submit("word " * 400, SamplingParams(max_new_tokens=4), None, Recorder())
        assert wait_result(engine, PROMPTS[0], SamplingParams(max_new_tokens=4)).token_ids
    finally:
        engine.close()


def test_unknown_absolute_position_encoder_decoders_are_refused():
    """An encoder-decoder family the engine has no positions for (FSMT) is refused with the
    reason, and the server keeps it on static batches; causal LMs and T5 are admitted."""
    import transformers

    from actors.engine import engine_unsupported

    config = transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=64, tgt_vocab_size=64, d_model=32,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
    )  # fmt: skip
    model = transformers.FSMTForConditionalGeneration(config).eval()
    model.generation_config.forced_eos_token_id = None
    reason = engine_unsupported(model)
    assert reason is not None and "'fsmt'" in reason and "bart" in reason and "t5" in reason
    with pytest.raises(ValueError, match="continuous batching: the 'fsmt' decoder"):
        ContinuousBatchingEngine(model, None)
    assert engine_unsupported(_llama()[0]) is None and engine_unsupported(_seq2seq()[0]) is None


def test_queue_bound_refuses_and_kv_budget_makes_requests_wait():
    model, tok = _llama()
    n = len(tok(PROMPTS[0], add_special_tokens=False)["input_ids"])
    limits = EngineLimits(max_running=4, max_cached_tokens=n + 40, max_queued=1)
    engine = ContinuousBatchingEngine(model, tok, limits)
    try:
        with engine.lock:  # the engine thread blocks before its first step
            first = Recorder()
            engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=40), None, first)
            deadline = time.monotonic() + 10
            while engine.stats()["waiting"] and time.monotonic() < deadline:
                time.sleep(0.005)  # the engine took it (it waits on the lock to prefill)
            second = Recorder()
            engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=40), None, second)
            with pytest.raises(EngineOverloaded, match="max_queued=1"):
                engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=4), None, Recorder())
        # The second fits the KV budget only after the first leaves: it never ran beside it.
        first.result(), second.result()
        stats = engine.stats()
        assert max(stats["decode_batch_sizes"]) == 1, stats
        assert stats["refused"] == 1
        with pytest.raises(ValueError, match="max_cached_tokens"):
            engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=200), None, Recorder())
    finally:
        engine.close()


def test_cancel_frees_the_slot_at_the_next_step():
    model, tok = _llama()
    engine = ContinuousBatchingEngine(model, tok, EngineLimits(max_running=1))
    try:
        started = threading.Event()
        rec = Recorder(on_first=started.set)
        rid = engine.submit(PROMPTS[1] + " " + PROMPTS[3], SamplingParams(max_new_tokens=5000),
                            None, rec)  # fmt: skip
        assert started.wait(60)
        engine.cancel(rid)
        deadline = time.monotonic() + 30
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0 and engine.stats()["cancelled"] == 1
        assert not rec.finished.is_set()  # a cancelled request says nothing more
        # the one slot is free again
        assert wait_result(engine, PROMPTS[0], SamplingParams(max_new_tokens=3)).completion_tokens
    finally:
        engine.close()


def test_a_failing_prompt_fails_alone_and_position_limit_ends_with_length():
    """GPT-2's learned position table is an ``IndexError`` past ``n_positions``: a too-long
    prompt prefilled with others fails alone; a generation reaching the limit stops there."""
    model, tok = _gpt2(n_positions=64)
    engine = ContinuousBatchingEngine(model, tok)
    try:
        good = [Recorder() for _ in range(2)]
        bad = Recorder()
        with engine.lock:
            engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=8), None, good[0])
            engine.submit("word " * 80, SamplingParams(max_new_tokens=8), None, bad)
            engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=8), None, good[1])
        with pytest.raises(IndexError):
            bad.result()
        for i, rec in enumerate(good):
            assert rec.result().token_ids == reference(model, tok, PROMPTS[i], 8)[:8]
        long = wait_result(engine, PROMPTS[0], SamplingParams(max_new_tokens=200))
        n = len(tok(PROMPTS[0], add_special_tokens=False)["input_ids"])
        # the k-th new token sits at position n + k - 1; position 63 is the last there is
        assert n + long.completion_tokens <= 64 + 1
        assert long.finish_reason == "stop" or n + long.completion_tokens == 64 + 1
    finally:
        engine.close()


def test_a_model_without_adapters_never_imports_peft(monkeypatch):
    """Importing peft takes 0.1-2 s: a replica without adapters must not spend it on its
    engine thread, where the first requests would wait for it."""
    import sys

    model, tok = _llama()
    monkeypatch.delitem(sys.modules, "peft", raising=False)
    engine = ContinuousBatchingEngine(model, tok)
    try:
        done = wait_result(engine, PROMPTS[0], SamplingParams(max_new_tokens=4))
    finally:
        engine.close()
    assert done.completion_tokens > 0
    assert "peft" not in sys.modules


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_a_byte_fallback_tokenizer_streams_whole_characters_that_join_to_the_text(kind, caplog):
    """With a tokenizer that spells characters outside its vocabulary as byte tokens
    (SentencePiece's BPE and Unigram layouts: Llama 2, Mistral, Gemma), a character arrives
    over several steps: the engine's check of the tokenizer lets its streaming decoder
    through, no piece carries half a character (U+FFFD) where the whole text has none, and
    the pieces join to the completion's text, its ids decoded whole, also where a later byte
    turns characters already complete into U+FFFD, and where an id that ``decode`` drops (a
    special token the config does not name, an id beyond the tokenizer) joins two runs; the
    same when it decodes whole texts. Tokens are scripted: characters of 2 to 4 bytes split
    across steps, 日 broken by a stray byte, runs split by dropped ids, then random ids
    (orphan and truncated byte sequences included)."""
    from tokenizers import AddedToken

    from actors.engine import _stream_decoder, byte_runs
    from actors.tiny import byte_fallback_tokenizer

    model, _ = _llama()
    tok = byte_fallback_tokenizer([*PROMPTS, "The quick brown fox jumps over the lazy dog."],
                                  model=kind)  # fmt: skip
    tok.add_tokens([AddedToken("<|tool|>", special=True)])  # special, not named in the config
    tool, beyond = tok.convert_tokens_to_ids("<|tool|>"), len(tok) + 5
    assert tool not in tok.all_special_ids and beyond < model.config.vocab_size
    assert None not in tok.convert_ids_to_tokens(list(range(len(tok))))
    assert _stream_decoder(tok, byte_runs(tok)) is not None
    spelled = tok("Ünïcödé 日本語 🙂 fox", add_special_tokens=False)["input_ids"]
    assert sum(t.startswith("<0x") for t in tok.convert_ids_to_tokens(spelled)) >= 10
    assert tok.decode(spelled) == "Ünïcödé 日本語 🙂 fox"  # the bytes are text, not special
    rng = random.Random(0)
    stop = set(stop_token_ids(tok, model)) | set(tok.all_special_ids)
    pool = [i for i in range(len(tok)) if i not in stop]
    byte = {b: tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    ri = [byte[b] for b in "日".encode()]
    fox = spelled[-2:]
    scripts = [
        spelled,
        [*ri, byte[0x80], *fox],  # 日, then a byte that makes its run invalid UTF-8
        *([*ri, dropped, byte[0x80], *fox] for dropped in (tool, beyond)),  # runs joined
        *([ri[0], dropped, *ri[1:], *fox] for dropped in (tool, beyond)),  # 日 split
        *([rng.choice([*pool, tool, beyond]) for _ in range(30)] for _ in range(6)),
    ]
    for script in scripts:
        # the engine's streaming decoder, and its whole texts (a tokenizer it cannot stream)
        for streaming in (True, False):
            params = SamplingParams(max_new_tokens=len(script))
            done, rec, still = _scripted(model, tok, script, params, streaming)
            assert still == streaming, script  # never fell back to whole texts
            assert done.token_ids == script
            assert done.text == tok.decode(script, skip_special_tokens=True)
            assert "".join(rec.pieces) == done.text, (streaming, script, rec.pieces)
            if "\ufffd" not in done.text:
                assert not any("\ufffd" in piece for piece in rec.pieces), rec.pieces
            if script is spelled:  # streamed as it went, not handed over whole at the end
                assert len(rec.pieces) > 3, rec.pieces
    assert "decodes token by token differently" not in caplog.text


def test_a_streaming_decoder_that_raises_on_a_request_falls_back_for_that_request(caplog):
    """If the tokenizer's streaming decoder raises on a generated sequence (tokenizers'
    "Invalid prefix" when new ids change the text of earlier ones), that step and the batch go
    on: that request's text is decoded whole from then on, its pieces still join to it, and
    the engine says so; the request beside it and later ones keep streaming token by token
    (a long-running replica does not fall back to O(length²) decoding for good)."""
    from tokenizers.decoders import DecodeStream

    class Failing:
        """A streaming decoder; the first one made raises at its fifth step."""

        made = 0
        steps: ClassVar[list[int]] = []

        def __init__(self, skip_special_tokens: bool) -> None:
            self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            self.index = Failing.made
            Failing.made += 1
            Failing.steps.append(0)

        def step(self, tokenizer: Any, ids: Any) -> str | None:
            Failing.steps[self.index] += 1
            if self.index == 0 and Failing.steps[0] == 5:
                raise Exception("Invalid prefix encountered while decoding stream.")
            return self.stream.step(tokenizer, ids)

    model, tok = _llama()
    engine = ContinuousBatchingEngine(model, tok)
    engine._streaming = Failing
    try:
        recs = [Recorder() for _ in PROMPTS[:3]]
        for prompt, rec in zip(PROMPTS[:2], recs[:2], strict=True):  # two together
            engine.submit(prompt, SamplingParams(max_new_tokens=NEW), None, rec)
        recs[0].result()
        engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=NEW), None, recs[2])  # later
        for prompt, rec in zip(PROMPTS[:3], recs, strict=True):
            done = rec.result()
            want = tok.decode(reference(model, tok, prompt), skip_special_tokens=True)
            assert done.text == want == "".join(rec.pieces)
            assert done.completion_tokens > 5
        assert engine._streaming is Failing and Failing.made == 3
        # the failed request's decoder was not stepped again; the others ran to their ends
        assert Failing.steps[0] == 5 and min(Failing.steps[1:]) > 5, Failing.steps
        assert caplog.text.count("streaming decoder failed") == 1
        assert engine.stats()["stream_fallbacks"] == 1
    finally:
        engine.close()
