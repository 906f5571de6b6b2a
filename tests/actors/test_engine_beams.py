"""Beam search on the continuous-batching engine (``actors.beam_search``): a model whose
generation_config selects beam search runs each request's beams as rows of the shared batch,
and every request's completion equals what ``generate`` makes for it alone with the model's
configuration (through the static path, ``generate_batch``): alone, joined mid-decode at
different budgets, with stop strings, n-gram bans, length penalties and early stopping, seeded
beam sampling, and through LoRA adapters; a beam request's rows count against the scheduler's
limits and a cancelled one frees all of them."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from actors.engine import ContinuousBatchingEngine, EngineLimits, engine_unsupported, wait_result
from actors.generation import Completion, SamplingParams, generate_batch
from tests.actors.test_engine import (
    PROMPTS,
    Recorder,
    _gpt2,
    _llama,
    _seq2seq,
    _staggered_joins,
    _two_adapters,
)

BEAMS = 3


def _beam_model(kind: str, **generation: Any) -> tuple[Any, Any]:
    """A tiny ``kind`` model whose generation_config asks for beam search (and ``generation``),
    with a two-gram ban, as published summarizers configure theirs."""
    models = {"llama": _llama, "gpt2": _gpt2, "t5": _seq2seq,
              "bart": lambda: _seq2seq("bart", position_scale=10.0)}  # fmt: skip
    model, tok = models[kind]()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.num_beams = BEAMS
    model.generation_config.no_repeat_ngram_size = 2
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    assert engine_unsupported(model) is None
    return model, tok


def _static(model: Any, tok: Any, prompt: str, params: SamplingParams) -> Completion:
    """What ``generate`` makes for this prompt alone, with the model's own configuration."""
    (done,) = generate_batch(model, tok, [prompt], params, model.config.is_encoder_decoder)
    return done


def _same(got: Completion, want: Completion) -> bool:
    keys = ("text", "finish_reason", "completion_tokens", "token_ids", "prompt_tokens")
    return all(getattr(got, k) == getattr(want, k) for k in keys)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5", "bart"])
def test_beam_search_equals_generate_alone_and_joined_mid_decode(kind):
    """Each request alone, then requests joining a running batch at different budgets (with and
    without a stop string): every completion equals ``generate``'s for it alone, and the
    searches shared decode steps (more rows than one search's)."""
    model, tok = _beam_model(kind)
    engine = ContinuousBatchingEngine(model, tok)
    try:
        for prompt in PROMPTS[:3]:
            params = SamplingParams(max_new_tokens=10)
            recorder = Recorder()
            engine.submit(prompt, params, None, recorder)
            done, want = recorder.result(), _static(model, tok, prompt, params)
            assert _same(done, want), (prompt, done, want)
            # no beam is final before the search ends: the text goes out in one piece
            assert recorder.pieces == ([done.text] if done.text else [])
        jobs = [(p, SamplingParams(max_new_tokens=5 + 3 * i, stop=("e",) if i % 2 else ()))
                for i, p in enumerate(PROMPTS)]  # fmt: skip
        jobs.insert(2, (PROMPTS[1], SamplingParams(max_new_tokens=1)))  # ends at its prefill
        for (prompt, params), done in zip(jobs, _staggered_joins(engine, jobs), strict=True):
            want = _static(model, tok, prompt, params)
            assert _same(done, want), (prompt, params, done, want)
        stats = engine.stats()
        assert max(stats["decode_batch_sizes"]) >= 3 * BEAMS, stats
        assert set(stats["decode_batch_sizes"]) <= set(range(BEAMS, 100, BEAMS))
        assert stats["running"] == 0 and stats["cache_width"] == 0
    finally:
        engine.close()


@pytest.mark.parametrize("early_stopping,length_penalty",
                         [(False, 1.0), (True, 0.5), ("never", 2.0)])  # fmt: skip
def test_early_stopping_and_length_penalty_end_searches_as_generate_ends_them(
    early_stopping, length_penalty, monkeypatch
):
    """Searches that end at different steps (an EOS, a stop string, the budget) under each
    ``early_stopping`` rule and a length penalty, together in one batch: each equals
    ``generate``'s, both finish reasons occur, and the searches with the same stop strings
    share one stop-string criterion (building one walks the vocabulary on the engine thread)."""
    from transformers import StopStringCriteria

    built, init = [], StopStringCriteria.__init__

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(kwargs.get("stop_strings", args[1:]))
        init(self, *args, **kwargs)

    monkeypatch.setattr(StopStringCriteria, "__init__", counted)
    model, tok = _beam_model("t5", early_stopping=early_stopping, length_penalty=length_penalty)
    engine = ContinuousBatchingEngine(model, tok)
    try:
        jobs = [(p, SamplingParams(max_new_tokens=6 + 3 * i, stop=stop))
                for i, p in enumerate(PROMPTS) for stop in ((), ("e",))]  # fmt: skip
        recorders = []
        with engine.lock:  # all queued before the first step: they run side by side
            for prompt, params in jobs:
                recorders.append(Recorder())
                engine.submit(prompt, params, None, recorders[-1])
        results = [recorder.result() for recorder in recorders]
        assert len(built) == 1, built  # one for the len(PROMPTS) searches that stop at "e"
        reasons = set()
        for (prompt, params), done in zip(jobs, results, strict=True):
            want = _static(model, tok, prompt, params)
            assert _same(done, want), (prompt, params, done, want)
            reasons.add(done.finish_reason)
        assert reasons == {"stop", "length"}
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_seeded_beam_sampling_is_generates_alone_and_in_a_busy_batch(kind):
    """A sampled beam search (``do_sample`` with beams) draws from its request's own seed: the
    same tokens as ``generate`` after ``torch.manual_seed`` of that seed, alone and beside
    other sampled searches."""
    model, tok = _beam_model(kind)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=5)
    want = _static(model, tok, PROMPTS[0], params)
    engine = ContinuousBatchingEngine(model, tok)
    try:
        assert _same(wait_result(engine, PROMPTS[0], params), want)
        others = [Recorder() for _ in range(2)]
        mine = Recorder()
        with engine.lock:
            for i, recorder in enumerate(others):
                other = SamplingParams(max_new_tokens=16, temperature=1.2, seed=50 + i)
                engine.submit(PROMPTS[i + 1], other, None, recorder)
            engine.submit(PROMPTS[0], params, None, mine)
        assert _same(mine.result(), want)
        for recorder in others:
            recorder.result()
        assert max(engine.stats()["decode_batch_sizes"]) == 3 * BEAMS
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_beam_searches_through_different_adapters_share_a_batch(tmp_path, kind):
    """Beam searches through the base, adapter a and adapter b in one batch: each equals PEFT's
    own beam search with only that adapter active."""
    served, tok, _ = _two_adapters(tmp_path, kind)
    served.generation_config.num_beams = BEAMS
    served.generation_config.no_repeat_ngram_size = 2
    params = SamplingParams(max_new_tokens=10)
    engine = ContinuousBatchingEngine(served, tok)
    try:
        recorders = {name: Recorder() for name in (None, "a", "b")}
        with engine.lock:
            for name, recorder in recorders.items():
                engine.submit(PROMPTS[0], params, name, recorder)
        outputs = {name: recorder.result() for name, recorder in recorders.items()}
        assert max(engine.stats()["decode_batch_sizes"]) == 3 * BEAMS
    finally:
        engine.close()
    for name, done in outputs.items():
        if name is None:
            with served.disable_adapter():
                want = _static(served, tok, PROMPTS[0], params)
        else:
            served.set_adapter(name)
            want = _static(served, tok, PROMPTS[0], params)
        assert _same(done, want), name
    assert outputs["a"].token_ids != outputs["b"].token_ids != outputs[None].token_ids


def test_beams_count_against_the_limits_and_a_cancel_frees_every_row():
    """A search holds one row per beam: with room for four rows two searches of three beams
    never run together; a search wider than the batch is refused (an engine built so, or a
    request once the limit is lowered); a cancelled search's rows all leave at the next
    step."""
    model, tok = _beam_model("llama")
    with pytest.raises(ValueError, match=r"3 beams.*max_running=2"):
        ContinuousBatchingEngine(model, tok, EngineLimits(max_running=2))
    engine = ContinuousBatchingEngine(model, tok, EngineLimits(max_running=4))
    try:
        recorders = [Recorder() for _ in range(2)]
        with engine.lock:
            for prompt, recorder in zip(PROMPTS, recorders, strict=False):
                engine.submit(prompt, SamplingParams(max_new_tokens=8), None, recorder)
        for prompt, recorder in zip(PROMPTS, recorders, strict=False):
            assert _same(recorder.result(),
                         _static(model, tok, prompt, SamplingParams(max_new_tokens=8)))  # fmt: skip
        assert set(engine.stats()["decode_batch_sizes"]) == {BEAMS}

        rid = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=2000), None, Recorder())
        deadline = time.monotonic() + 30
        while engine.stats()["running"] < BEAMS:  # prefilled and expanded to its beams
            assert time.monotonic() < deadline
            time.sleep(0.005)
        engine.cancel(rid)
        while engine.stats()["running"]:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.005)
        stats = engine.stats()
        assert stats["cancelled"] == 1 and stats["running_requests"] == 0, stats
        # a cancel that marked only the request's own row (its beams' rows were made after it
        # looked): they leave with it
        deadline = time.monotonic() + 30
        engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=2000), None, Recorder())
        while engine.stats()["running"] < BEAMS:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with engine.lock:  # between two steps
            next(s for s in engine._running if s.head).cancelled = True
        while engine.stats()["running"]:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.005)
        assert engine.stats()["cancelled"] == 2
        assert wait_result(engine, PROMPTS[2], SamplingParams(max_new_tokens=3)).token_ids
        engine.limits = EngineLimits(max_running=2)  # lowered while serving (a hot config)
        with pytest.raises(ValueError, match=r"3 beams.*max_running=2"):
            engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=4), None, Recorder())
    finally:
        engine.close()


def test_a_search_reaching_the_position_table_ends_there_with_length():
    """GPT-2's learned positions end at ``n_positions``: a search whose budget runs past them
    ends at the table's last position with ``length`` (``generate`` would fail there), while
    a search beside it that fits is unchanged."""
    model, tok = _gpt2(n_positions=64)
    tok.pad_token = tok.pad_token or tok.eos_token
    model.generation_config.num_beams = BEAMS
    long_prompt = " ".join(PROMPTS[:3])
    n = len(tok(long_prompt, add_special_tokens=False)["input_ids"])
    engine = ContinuousBatchingEngine(model, tok)
    try:
        short, long = Recorder(), Recorder()
        with engine.lock:
            engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=8), None, short)
            engine.submit(long_prompt, SamplingParams(max_new_tokens=200), None, long)
        done = long.result()
        assert done.finish_reason == "length" and n + done.completion_tokens == 64 + 1, n
        want = _static(model, tok, PROMPTS[0], SamplingParams(max_new_tokens=8))
        assert _same(short.result(), want)
    finally:
        engine.close()


def test_a_failing_search_fails_alone_and_a_prompt_past_the_table_ends_at_once(monkeypatch):
    """A search whose step raises fails alone: the searches beside it finish as ``generate``
    makes them and the engine goes on. A prompt longer than a rotary model's position table
    ends after one token (as a greedy request does), not with an error for the batch."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from actors.beam_search import BeamSearch
    from actors.tiny import tiny_model_path

    source = tiny_model_path("tiny:llama")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(source, max_position_embeddings=40)
    model = AutoModelForCausalLM.from_config(config).eval()
    tok = AutoTokenizer.from_pretrained(source)
    model.generation_config.num_beams = BEAMS
    bad = tok(PROMPTS[2], add_special_tokens=False)["input_ids"]
    real = BeamSearch.step

    def step(self: BeamSearch, logits: torch.Tensor) -> list[int]:
        if self.cur_len == self.prompt_len + 2 and self.running[0, 0, : len(bad)].tolist() == bad:
            raise RuntimeError("planted failure in one search's step")
        return real(self, logits)

    monkeypatch.setattr(BeamSearch, "step", step)
    long_prompt = " ".join(PROMPTS)
    assert len(tok(long_prompt, add_special_tokens=False)["input_ids"]) > 40
    params = SamplingParams(max_new_tokens=8)
    engine = ContinuousBatchingEngine(model, tok)
    try:
        recorders = {p: Recorder() for p in (PROMPTS[0], PROMPTS[2], PROMPTS[3])}
        with engine.lock:
            for prompt, recorder in recorders.items():
                engine.submit(prompt, params, None, recorder)
        with pytest.raises(RuntimeError, match="planted failure"):
            recorders[PROMPTS[2]].result()
        monkeypatch.setattr(BeamSearch, "step", real)
        for prompt in (PROMPTS[0], PROMPTS[3]):
            assert _same(recorders[prompt].result(), _static(model, tok, prompt, params))
        running = Recorder()  # a search within the table, running when the long one joins
        fits = SamplingParams(max_new_tokens=38 - len(tok(PROMPTS[0])["input_ids"]))
        engine.submit(PROMPTS[0], fits, None, running)
        assert wait_result(engine, long_prompt, params).completion_tokens == 1
        assert _same(running.result(), _static(model, tok, PROMPTS[0], fits))
        stats = engine.stats()
        assert stats["failed"] == 1 and stats["running"] == 0, stats
    finally:
        engine.close()


def test_requests_that_no_longer_fit_lowered_limits_fail_instead_of_waiting():
    """Limits lowered while a search waits (a hot config) so that it can never run: it fails
    with the limits named, rather than waiting for ever."""
    model, tok = _beam_model("llama")
    engine = ContinuousBatchingEngine(model, tok, EngineLimits(max_running=4))
    try:
        first = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=2000), None, Recorder())
        deadline = time.monotonic() + 30
        while engine.stats()["running"] < BEAMS:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        waiting = Recorder()
        engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=4), None, waiting)
        assert engine.stats()["waiting"] == 1  # three rows of four are taken
        engine.limits = EngineLimits(max_running=2)
        with pytest.raises(ValueError, match="max_running=2"):
            waiting.result(timeout_s=30)
        engine.cancel(first)
    finally:
        engine.close()
